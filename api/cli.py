"""The `v4ray` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _make_tiny(args) -> int:
    from v4ray.model.tiny import make_tiny

    path = make_tiny(args.dir, preset=args.preset, dtype=args.dtype, seed=args.seed,
                     experts_per_file=args.experts_per_file)
    print(f"wrote tiny DeepSeek-V4 checkpoint ({args.preset}, {args.dtype}, seed {args.seed}) to {path}")
    return 0


def _generate(args) -> int:
    from v4ray.cluster.llm import LLM
    from v4ray.engine.sampling import SamplingParams

    llm = LLM(model=args.model, **({"dtype": args.dtype} if args.dtype else {}),
              **({"enforce_eager": True} if args.enforce_eager else {}))
    given = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
             "top_k": args.top_k, "seed": args.seed, "stop": args.stop}
    params = SamplingParams(**{k: v for k, v in given.items() if v is not None})  # the rest: SamplingParams
    for out in llm.generate(args.prompt, params):
        for c in out.outputs:
            if args.json:
                print(json.dumps({"prompt": out.prompt, "text": c.text, "token_ids": c.token_ids,
                                  "finish_reason": c.finish_reason}))
            else:
                print(f"{out.prompt!r} -> {c.text!r} ({len(c.token_ids)} tokens, {c.finish_reason})")
    return 0


def _helm_schema(args) -> int:
    from v4ray.serve.schema import SCHEMA_FILE, write_or_check

    path = Path(args.chart) / SCHEMA_FILE
    if write_or_check(Path(args.chart), args.check):
        print(f"{path}: serve.args matches ServeConfig" if args.check else f"wrote {path}")
        return 0
    print(f"{path}: serve.args is stale; run `v4ray helm-schema --chart {args.chart}`", file=sys.stderr)
    return 1


def _plan_kv(args) -> int:
    from v4ray.cluster.plan import format_plan_kv, plan_kv
    from v4ray.model.config import resolve_config

    p = plan_kv(resolve_config(args.model), args.context, args.kv_dtype, args.block_size)
    print(json.dumps(p, indent=2) if args.json else format_plan_kv(p))
    return 0


def _score(args) -> int:
    from v4ray.cluster.score import main as score_main

    return score_main(args)


def _serve(args) -> int:
    """Deploy the config's application on an embedded local Ray sized for its layout (or --address), print the
    URL, and serve until Ctrl-C or SIGTERM; then shut Serve (and the embedded Ray) down. A layout the cluster can
    never hold fails before deploying, naming what is missing; a deployment still waiting says what for."""
    import signal
    import threading

    import yaml

    from v4ray.cluster.local_ray import ensure_ray
    from v4ray.cluster.placement import (PENDING_REPORT_AFTER_S, bundle_totals, cluster_nodes, cluster_problem,
                                         pending_report)
    from v4ray.serve.app import server_placement
    from v4ray.serve.config import ServeConfig

    with open(args.config) as f:
        conf = yaml.safe_load(f) or {}
    apps = conf.get("applications") or []
    if len(apps) != 1:
        raise ValueError(f"{args.config}: 'applications' must hold exactly one v4ray application")
    app_conf = apps[0]
    serve_config = ServeConfig(**(app_conf.get("args") or {}))
    bundles, _ = server_placement(serve_config)   # what the embedded Ray must offer (before it starts)
    http = conf.get("http_options") or {}
    host, port = http.get("host", "127.0.0.1"), int(args.port or http.get("port", 8000))
    stop, deployed = threading.Event(), threading.Event()

    def on_signal(*_) -> None:
        stop.set()
        if not deployed.is_set():
            raise KeyboardInterrupt   # serve.run blocks until the application runs: a deployment still waiting stops

    ensure_ray(args.address, num_cpus=bundle_totals(bundles).get("CPU", 0) * serve_config.max_replicas())
    import ray

    bundles, strategy = server_placement(serve_config, cluster_nodes())   # PACK or SPREAD by the real nodes
    problem = cluster_problem(bundles, strategy)
    if problem:
        ray.shutdown()
        raise ValueError(f"the V4Server replica cannot be deployed: {problem}")
    from ray import serve

    from v4ray.serve.app import build_app

    def report_waiting() -> None:
        waited_s = PENDING_REPORT_AFTER_S
        while not deployed.wait(PENDING_REPORT_AFTER_S):
            try:
                print(f"v4ray serve: not deployed after {waited_s:.0f}s; {pending_report(bundles)}", flush=True)
            except Exception:  # noqa: BLE001 - Ray is shutting down
                return
            waited_s += PENDING_REPORT_AFTER_S

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        serve.start(http_options={"host": host, "port": port}, proxy_location=conf.get("proxy_location", "HeadOnly"))
        threading.Thread(target=report_waiting, daemon=True).start()
        serve.run(build_app(app_conf.get("args") or {}), name=app_conf.get("name", "v4ray"),
                  route_prefix=app_conf.get("route_prefix", "/"))
        deployed.set()
        print(f"v4ray is serving the OpenAI API at http://{host}:{port}/v1 (Ctrl-C to stop)", flush=True)
        stop.wait()
    except KeyboardInterrupt:
        print("v4ray serve: stopped before the application was deployed", file=sys.stderr, flush=True)
        return 130
    finally:
        deployed.set()
        print("shutting down", flush=True)
        if args.address:
            serve.delete(app_conf.get("name", "v4ray"))
        else:
            serve.shutdown()
        ray.shutdown()
    return 0


def build_parser() -> argparse.ArgumentParser:
    from v4ray.model.config import preset_names
    from v4ray.engine.config import DTYPES as ENGINE_DTYPES, KV_CACHE_DTYPES
    from v4ray.model.tiny import DTYPES

    p = argparse.ArgumentParser(prog="v4ray", description="Serve DeepSeek-V4 on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("make-tiny", help="write a random tiny V4 checkpoint in the official format")
    t.add_argument("dir", help="output directory")
    tiny = [n for n in preset_names() if n.startswith("v4-tiny")]
    t.add_argument("--preset", default="v4-tiny", help=f"one of {', '.join(tiny)} (default v4-tiny)")
    t.add_argument("--dtype", default="bf16", choices=DTYPES, help="storage format (default bf16)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--experts-per-file", type=int, default=2, help="routed experts per shard file")
    t.set_defaults(func=_make_tiny)

    g = sub.add_parser("generate", help="generate offline in this process")
    g.add_argument("--model", required=True, help="checkpoint directory")
    g.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    g.add_argument("--max-tokens", type=int, default=None, help="default: SamplingParams' (16)")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="a stop string (repeatable)")
    g.add_argument("--dtype", default=None, choices=ENGINE_DTYPES, help="default: EngineConfig's (auto)")
    g.add_argument("--enforce-eager", action="store_true", help="every step eager: no start-up compile of the "
                                                                "decode step (a minute cold on a small CPU)")
    g.add_argument("--json", action="store_true", help="one JSON object per completion")
    g.set_defaults(func=_generate)

    sc = sub.add_parser("score", help="batch scoring of a JSONL file (also as `ray job submit -- v4ray score ...`)")
    sc.add_argument("--model", required=True, help="checkpoint directory")
    sc.add_argument("--input", required=True, help="JSONL rows: {id, prompt} | {id, messages} | OpenAI Batch rows")
    sc.add_argument("--output", required=True, help="JSONL results, appended; ids already there are skipped")
    sc.add_argument("--mode", default="complete", choices=["complete", "logprobs"])
    sc.add_argument("--routers", type=int, default=1)
    sc.add_argument("--expert-shards", type=int, default=0, help="> 0: a Router/ExpertShard replica on Ray")
    sc.add_argument("--max-tokens", type=int, default=None, help="default max_tokens of completion rows "
                                                                 "(default: SamplingParams' 16)")
    sc.add_argument("--max-in-flight", type=int, default=32, help="rows admitted to the engine at once")
    sc.add_argument("--max-model-len", type=int, default=None, help="default: the model's")
    sc.add_argument("--dtype", default=None, choices=ENGINE_DTYPES, help="default: EngineConfig's (auto)")
    sc.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default: EngineConfig's, auto)")
    sc.add_argument("--kv-cache-dtype", default=None, choices=KV_CACHE_DTYPES, help="default: auto (the compute "
                                                                                     "dtype's)")
    sc.add_argument("--gpus-per-router", type=float, default=None, help="GPUs each router (or the engine) reserves")
    sc.add_argument("--gpus-per-shard", type=float, default=None, help="GPUs each expert shard reserves")
    sc.add_argument("--enforce-eager", action="store_true", help="every step eager (no compiled decode step)")
    sc.add_argument("--address", default=None, help="Ray cluster (default: $RAY_ADDRESS inside a Ray job)")
    sc.set_defaults(func=_score)

    sv = sub.add_parser("serve", help="serve the OpenAI API with Ray Serve")
    sv.add_argument("--config", default="ray_config.yaml", help="a Ray Serve config file (default ray_config.yaml)")
    sv.add_argument("--address", default=None, help="join this Ray cluster instead of starting a local one")
    sv.add_argument("--port", type=int, default=None, help="override http_options.port")
    sv.set_defaults(func=_serve)

    hs = sub.add_parser("helm-schema", help="regenerate the chart's serve.args schema from ServeConfig")
    hs.add_argument("--chart", default="helm/v4ray", help="chart directory (default helm/v4ray)")
    hs.add_argument("--check", action="store_true", help="only check; exit 1 when the file is stale")
    hs.set_defaults(func=_helm_schema)

    plan = sub.add_parser("plan", help="capacity planning").add_subparsers(dest="plan", required=True)
    k = plan.add_parser("kv", help="KV-cache bytes per token and per sequence, against DeepSeek-V3.2")
    k.add_argument("--model", required=True, help="a preset, a config.json or a checkpoint directory")
    k.add_argument("--context", type=int, default=1048576, help="context length in tokens (default 1M)")
    k.add_argument("--kv-dtype", default="fp8", choices=["fp8", "bf16", "fp32"])
    k.add_argument("--block-size", type=int, default=None, help="tokens per KV block (default: derived)")
    k.add_argument("--json", action="store_true")
    k.set_defaults(func=_plan_kv)
    from v4ray.cluster.planner import add_layout_parser
    add_layout_parser(plan)  # `plan layout`
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "make-tiny":
        from v4ray.model.config import preset_names
        if args.preset not in preset_names():
            print(f"v4ray make-tiny: error: unknown preset {args.preset!r}; choose one of "
                  f"{', '.join(preset_names())}", file=sys.stderr)
            return 2
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # ConfigError and CheckpointError are ValueErrors
        print(f"v4ray {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
