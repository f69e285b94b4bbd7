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

    rep = Replica(ReplicaConfig(EngineConfig(model=ckpt, num_expert_shards=1, kv_cache_dtype="fp8"))).start()
    try:                                                                                  # each Router
        stats = rep._get(rep.routers[0].stats.remote(), 60, "stats")
        info = rep.actor_info()
    finally:
        rep.shutdown()
    router = stats["config"]
    assert router == EngineConfig(model=router["model"], num_expert_shards=1, kv_cache_dtype="fp8").model_dump()
    assert stats["kv_format"] == "fp8"                        # kv_cache_dtype reaches the router's cache
    assert info[0]["device"] == stats["device"] == "cpu"     # no GPU reserved: Ray hides them, auto is the CPU


def test_kv_cache_dtype_reaches_the_cache(tiny_ckpt):
    """kv_cache_dtype from LLM and from ServeConfig (the Serve deployment, Helm's serve.args) to PagedKVCache."""
    from v4ray import LLM
    from v4ray.serve.config import ServeConfig

    ckpt = str(tiny_ckpt("v4-tiny"))
    assert LLM(model=ckpt, kv_cache_dtype="fp8").engine.runner.cache.kv_format == "fp8"
    assert LLM(model=ckpt, dtype="float32").engine.runner.cache.kv_format == "fp32"   # auto: the compute dtype's
    assert ServeConfig(model=ckpt, kv_cache_dtype="bf16").engine_config().kv_cache_dtype == "bf16"


def test_pinning_resources_name_custom_resources_only():
    """kv_cache_service_resources (EngineConfig) and ingress_resources (ServeConfig) pin actors that reserve no
    CPU: only custom resources with finite amounts >= 0 are accepted, and the error names the field."""
    import pytest
    from pydantic import ValidationError

    from v4ray.serve.config import ServeConfig

    assert EngineConfig(model="m", kv_cache_service_resources={"head": 0.01}).kv_cache_service_resources == \
        {"head": 0.01}
    for field, cls in (("kv_cache_service_resources", EngineConfig), ("ingress_resources", ServeConfig)):
        for bad in ({"CPU": 1.0}, {"GPU": 0.5}, {"head": float("inf")}, {"head": -1.0}):
            with pytest.raises(ValidationError, match=field):
                cls(model="m", **{field: bad})
