"""One engine construction path: the offline LLM, the Serve deployment's config, each Router and `v4ray score` build
from one EngineConfig and share its defaults."""

from __future__ import annotations

from v4ray.engine.config import EngineConfig


def test_entry_points_share_the_engine_defaults(ray_session, tiny_ckpt):
    from v4ray import LLM
    from v4ray.cli import build_parser
    from v4ray.cluster.replica import Replica, ReplicaConfig
    from v4ray.cluster.score import engine_args
    from v4ray.model.kv_format import default_block_size
    from v4ray.serve.config import ServeConfig

    ckpt = str(tiny_ckpt("v4-tiny"))
    defaults = EngineConfig(model=ckpt).model_dump()

    llm = LLM(model=ckpt)                                            # offline
    assert llm.engine.config.model_dump() == defaults
    assert llm.engine.runner.cache.block_size == default_block_size(llm.config)
    assert llm.engine.scheduler.max_num_seqs == defaults["max_num_seqs"]

    assert ServeConfig(model=ckpt).engine_config().model_dump() == defaults   # the Serve deployment

    args = build_parser().parse_args(["score", "--model", ckpt, "--input", "in", "--output", "out"])
    scored = EngineConfig(model=ckpt, **engine_args(args)).model_dump()      # v4ray score
    assert {k for k in defaults if scored[k] != defaults[k]} == {"max_num_seqs"}  # = --max-in-flight, by design

    rep = Replica(ReplicaConfig(EngineConfig(model=ckpt, num_expert_shards=1))).start()   # each Router
    try:
        router = rep._get(rep.routers[0].stats.remote(), 60, "stats")["config"]
    finally:
        rep.shutdown()
    assert router == EngineConfig(model=router["model"], num_expert_shards=1).model_dump()
