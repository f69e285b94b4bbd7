"""Topology and memory planner: `v4ray plan layout` (docs/v4_model.md §1.3, §5.2-5.4; docs/architecture.md §9).

Decide apart from doing: plain arithmetic over tensor shapes, no devices. Counts come from the model code
itself, not from formulas: `V4Model(cfg)` built on the meta device holds every checkpoint tensor as a meta
buffer. It is built with one routed expert per layer (`expert_range=(0, 1)`), whose tensors count
`n_routed_experts` times (every expert has the same shapes), so V4-Pro plans in well under a second. The MTP
block (not part of `V4Model`) is one more `Block` with sliding-window attention and non-hash routing plus
`e_proj`/`h_proj`/`enorm`/`hnorm`/`norm`/`hc_head_*` (docs/v4_model.md §5.2).

A layout is one model replica: R routers (one GPU each: embedding, attention, gates, shared expert, head,
its KV pool) and S expert shards (one GPU each: a contiguous range of ceil(E/S) routed experts of every MoE
layer). Dense weights are replicated on every router (data-parallel attention), so a router's GPU must hold
them plus an activation reserve plus at least one sequence of KV at the requested context.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from v4ray.model.config import SWA, V4Config
from v4ray.model.kv_format import capacity, kv_bytes
# The checkpoint's FP8 linears (docs/v4_model.md §5.2), shared with `make-tiny` so both agree on storage formats.
from v4ray.model.tiny import _FP8_LINEARS

WEIGHT_FORMATS = ("bf16", "fp8", "fp8-dense-fp4-experts")
GIB = 1 << 30
FP8_BLOCK, FP4_BLOCK = 128, 32
# Stored in fp32 whatever the weight format (make-tiny and the official checkpoints alike).
_FP32_SUFFIXES = ("_fn", "_base", "_scale", "attn_sink", ".ape", "gate.bias")
_MTP_FP8 = (".e_proj", ".h_proj")
RUNTIME_WORKSPACE = 1 * GIB  # CUDA/NCCL/cuBLAS workspaces beyond the usable fraction's headroom


class LayoutError(ValueError):
    """No layout fits; the message says which constraint failed and by how much."""


# ---- tensor inventory and counts ----------------------------------------------------------------------

@dataclass(frozen=True)
class Tensor:
    name: str                  # official checkpoint name (expert tensors are those of expert 0)
    shape: tuple[int, ...]
    copies: int                # n_routed_experts for routed-expert tensors, else 1
    linear: bool               # a Linear weight (gets FP8/FP4 storage with scales)
    mtp: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def routed(self) -> bool:
        return ".ffn.experts." in self.name


def _block_tensors(model, prefix: str, mtp: bool, copies: int) -> list[Tensor]:
    from v4ray.model.v4 import Linear, checkpoint_name

    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Linear)}
    out = []
    for mod_name, buf in model.state_dict().items():  # persistent buffers: what a checkpoint holds
        name = prefix + checkpoint_name(mod_name)
        routed = ".ffn.experts." in name
        out.append(Tensor(name, tuple(buf.shape), copies if routed else 1, mod_name in linears, mtp))
    return out


def tensor_inventory(cfg: V4Config, mtp: bool = True) -> list[Tensor]:
    """Every checkpoint tensor (routed experts folded to one entry per layer and matrix), plus MTP if asked."""
    from v4ray.model.v4 import Block, V4Model

    E = cfg.n_routed_experts
    tensors = _block_tensors(V4Model(cfg, expert_range=(0, 1)), "", False, E)
    if mtp:
        for i in range(cfg.num_nextn_predict_layers):
            n = cfg.num_hidden_layers
            mcfg = cfg.replace(num_hidden_layers=n + 1, layer_types=cfg.layer_types + (SWA,),
                               compress_ratios=cfg.compress_ratios + (0,))
            pre = f"mtp.{i}."
            tensors += _block_tensors(Block(mcfg, n, (0, 1)), pre, True, E)
            D, hc = cfg.hidden_size, cfg.hc_mult
            extra = [("e_proj.weight", (D, D), True), ("h_proj.weight", (D, D), True), ("enorm.weight", (D,), False),
                     ("hnorm.weight", (D,), False), ("norm.weight", (D,), False),
                     ("hc_head_fn", (hc, hc * D), False), ("hc_head_base", (hc,), False), ("hc_head_scale", (1,), False)]
            tensors += [Tensor(pre + nm, shp, 1, lin, True) for nm, shp, lin in extra]
    return tensors


def tensor_bytes(t: Tensor, weights: str) -> int:
    """Stored bytes of one copy of `t` (value bytes plus block scales), as make-tiny and DeepSeek store it."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got {weights!r}")
    if t.name.endswith("tid2eid"):
        return 8 * t.numel
    if t.name.endswith(_FP32_SUFFIXES) and not t.linear:
        return 4 * t.numel
    base = t.name[: -len(".weight")]
    fp8_dense = t.linear and base.endswith(_FP8_LINEARS + _MTP_FP8)
    if weights != "bf16" and t.linear and t.routed and weights == "fp8-dense-fp4-experts":
        out, inn = t.shape
        return out * inn // 2 + out * math.ceil(inn / FP4_BLOCK)
    if weights != "bf16" and (fp8_dense or (t.linear and t.routed)):
        out, inn = t.shape
        return out * inn + math.ceil(out / FP8_BLOCK) * math.ceil(inn / FP8_BLOCK)
    return 2 * t.numel


@dataclass(frozen=True)
class ParamCounts:
    total: int                 # main model (what make-tiny writes)
    total_with_mtp: int
    active: int                # per token: all but the embedding lookup, tid2eid and unrouted experts; no MTP
    dense: int                 # everything a router holds except embedding and head
    routed: int                # routed experts, all layers
    embedding: int
    head: int
    mtp: int
    per_expert: int            # one routed expert (w1, w2, w3) of one layer
    moe_layers: int


def count_params(cfg: V4Config, tensors: list[Tensor] | None = None) -> ParamCounts:
    ts = tensors if tensors is not None else tensor_inventory(cfg, mtp=True)
    main = [t for t in ts if not t.mtp]
    emb = sum(t.numel for t in main if t.name == "embed.weight")
    head = sum(t.numel for t in main if t.name == "head.weight")
    routed = sum(t.numel * t.copies for t in main if t.routed)
    total = sum(t.numel * t.copies for t in main)
    lookup = sum(t.numel for t in main if t.name.endswith("tid2eid"))
    mtp = sum(t.numel * t.copies for t in ts if t.mtp)
    per_expert = sum(t.numel for t in main if t.routed and t.name.startswith("layers.0."))
    active = total - emb - lookup - routed + routed * cfg.num_experts_per_tok // cfg.n_routed_experts
    return ParamCounts(total, total + mtp, active, total - routed - emb - head, routed, emb, head, mtp,
                       per_expert, cfg.num_hidden_layers)


@dataclass(frozen=True)
class WeightBytes:
    router: int                # dense weights, replicated on every router
    per_expert_layer: int      # one routed expert of one MoE layer
    moe_layers: int            # layers holding routed experts (+ MTP when planned)
    total: int


def weight_bytes(cfg: V4Config, weights: str, mtp: bool = False, tensors: list[Tensor] | None = None) -> WeightBytes:
    ts = [t for t in (tensors if tensors is not None else tensor_inventory(cfg, mtp)) if mtp or not t.mtp]
    router = sum(tensor_bytes(t, weights) for t in ts if not t.routed)
    per_expert = sum(tensor_bytes(t, weights) for t in ts if t.routed and t.name.startswith("layers.0."))
    layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if mtp else 0)
    return WeightBytes(router, per_expert, layers, router + per_expert * cfg.n_routed_experts * layers)


# ---- layout ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PlanInput:
    gpu_mem_gib: float
    gpus_per_node: int
    nodes: int | None = None               # None: the fewest nodes that fit
    context: int = 131072
    weights: str = "fp8-dense-fp4-experts"
    kv_dtype: str = "fp8"
    usable_fraction: float = 0.90          # of GPU memory; the rest is CUDA context, fragmentation, headroom
    max_num_batched_tokens: int = 8192     # tokens per router step (sizes the activation reserve)
    max_num_seqs: int = 64                 # cap on sequences running at once per router
    block_size: int | None = None  # default: default_block_size(cfg)
    mtp: bool = False
    expert_shards: int | None = None       # force S instead of choosing it


def router_reserve(cfg: V4Config, p: PlanInput) -> int:
    """Activations of one router step of T tokens, from the widest per-token intermediates, plus logits."""
    D, n, H, d, T = cfg.hidden_size, cfg.hc_mult, cfg.num_attention_heads, cfg.head_dim, p.max_num_batched_tokens
    K, I = cfg.num_experts_per_tok, cfg.moe_intermediate_size
    per_token = (3 * n * D * 4                                # mHC streams in, out, mixed (fp32)
                 + 2 * H * d * 2                              # queries and attention output (bf16)
                 + cfg.o_groups * cfg.o_lora_rank * 2         # grouped output projection
                 + cfg.index_n_heads * cfg.index_head_dim * 2  # indexer queries
                 + cfg.n_routed_experts * 4                   # router scores (fp32)
                 + K * D * (2 + 2 + 4)                        # dispatch send/recv (bf16) and combine (fp32)
                 + 3 * I * 2)                                 # shared expert intermediates
    return T * per_token + p.max_num_seqs * cfg.vocab_size * 4 + RUNTIME_WORKSPACE


def shard_reserve(cfg: V4Config, p: PlanInput, routers: int, shards: int) -> int:
    """Rows one shard receives per step (R*T*K/S, x2 for routing imbalance) times their intermediates."""
    D, I = cfg.hidden_size, cfg.moe_intermediate_size
    rows = 2 * math.ceil(routers * p.max_num_batched_tokens * cfg.num_experts_per_tok / shards)
    return rows * (D * 2 + 2 * I * 4 + I * 2 + D * 4) + RUNTIME_WORKSPACE


def _pods(gpus: int, per_node: int) -> tuple[int, int]:
    """(replicas, gpus per pod): whole nodes when possible, else one pod."""
    if gpus >= per_node and gpus % per_node == 0:
        return gpus // per_node, per_node
    return 1, gpus


def pod_placement(routers: int, shards: int, gpus_per_node: int) -> dict:
    """The pods of one replica (one rank per GPU) and its placement strategy, by the rule Ray applies at placement
    time (`cluster.placement.choose_strategy`, each pod a Ray node): a replica that fits one node is one pod of
    routers and shards together, placed PACK (its all-to-all stays on the node's NVLink); a larger one is router
    pods and expert-shard pods of whole nodes, placed SPREAD."""
    from .placement import choose_strategy, layout_bundles

    colocated = routers + shards <= gpus_per_node
    if colocated:
        router_pods, shard_pods = (1, routers + shards), (0, 0)
    else:
        router_pods, shard_pods = _pods(routers, gpus_per_node), _pods(shards, gpus_per_node)
    nodes = [{"GPU": g} for n, g in (router_pods, shard_pods) for _ in range(n)]   # GPUs decide; CPUs follow
    bundles = layout_bundles(routers, shards, {"GPU": 1}, {"GPU": 1})
    return {"colocated": colocated, "strategy": choose_strategy(bundles, nodes),
            "router_pods": {"replicas": router_pods[0], "gpus_per_pod": router_pods[1]},
            "expert_pods": {"replicas": shard_pods[0], "gpus_per_pod": shard_pods[1]}}


def _choose(cfg: V4Config, p: PlanInput, nodes: int, wb: WeightBytes, usable: int) -> tuple[int, int] | str:
    """(routers, shards) for `nodes` nodes, or the reason none fits."""
    G, g, E = nodes * p.gpus_per_node, p.gpus_per_node, cfg.n_routed_experts
    expert_layer = wb.per_expert_layer * wb.moe_layers

    def shard_fits(S: int, R: int) -> bool:
        return math.ceil(E / S) * expert_layer + shard_reserve(cfg, p, R, S) <= usable

    if p.expert_shards is not None:
        S = p.expert_shards
        if not 1 <= S < G:
            return f"--expert-shards {S} leaves no GPU for a router on {G} GPUs"
        return (G - S, S) if shard_fits(S, G - S) else \
            f"{S} shards of {math.ceil(E / S)} experts need {_gib(math.ceil(E / S) * expert_layer)} of experts each"
    if G < 2:
        return "a layout needs at least 2 GPUs (one router, one expert shard)"
    feasible = [S for S in range(1, G) if shard_fits(S, G - S)]
    need = _gib(E * expert_layer)
    per_gpu = _gib(usable - RUNTIME_WORKSPACE)
    if not feasible:
        s_min = math.ceil(E * expert_layer / max(1, usable - RUNTIME_WORKSPACE))
        return (f"routed experts need {need} ({E} experts x {wb.moe_layers} MoE layers x "
                f"{wb.per_expert_layer / 2 ** 20:,.2f} MiB each) but a GPU holds at most {per_gpu} of them, so at least "
                f"{s_min} expert shards are needed; {nodes} node(s) x {g} GPUs leave at most {G - 1} "
                f"(one GPU must be a router)")
    s_min = feasible[0]
    if nodes == 1:
        divisors = [S for S in feasible if E % S == 0]
        S = divisors[0] if divisors else s_min
        return G - S, S
    shard_nodes = math.ceil(s_min / g)
    if shard_nodes >= nodes:
        return f"expert shards need {shard_nodes} whole node(s) of {nodes}, leaving none for routers"
    S = shard_nodes * g
    return (G - S, S) if shard_fits(S, G - S) else (G - s_min, s_min)


def _gib(b: float, digits: int = 1) -> str:
    return f"{b / GIB:,.{digits}f} GiB"


def plan_layout(cfg: V4Config, p: PlanInput) -> dict:
    """The layout of one replica on a GPU pool, with the memory arithmetic; raises LayoutError if none fits."""
    if p.weights not in WEIGHT_FORMATS:
        raise ValueError(f"--weights must be one of {WEIGHT_FORMATS}, got {p.weights!r}")
    if not 0 < p.usable_fraction <= 1:
        raise ValueError(f"usable fraction must be in (0, 1], got {p.usable_fraction}")
    if p.context < 1 or p.gpu_mem_gib <= 0 or p.gpus_per_node < 1 or (p.nodes is not None and p.nodes < 1):
        raise ValueError("context, GPU memory, GPUs per node and nodes must be positive")
    if p.context > cfg.max_position_embeddings:
        raise LayoutError(f"--context {p.context:,} exceeds the model's max_position_embeddings "
                          f"{cfg.max_position_embeddings:,}")
    tensors = tensor_inventory(cfg, mtp=True)
    counts = count_params(cfg, tensors)
    wb = weight_bytes(cfg, p.weights, p.mtp, tensors)
    usable = int(p.gpu_mem_gib * GIB * p.usable_fraction)
    kb = kv_bytes(cfg, p.kv_dtype, p.block_size)
    seq_bytes = kb.sequence_bytes(p.context)
    r_reserve = router_reserve(cfg, p)
    router_need = wb.router + r_reserve + seq_bytes
    fits_router = router_need <= usable
    reasons = []
    if not fits_router:
        hint = "larger GPUs, a shorter --context or fewer --max-num-batched-tokens"
        if p.weights == "bf16":
            hint = "--weights fp8, " + hint
        reasons.append(
            f"a router cannot fit on one {p.gpu_mem_gib:g} GiB GPU: dense weights {_gib(wb.router)} + activation "
            f"reserve {_gib(r_reserve)} + one {p.context:,}-token sequence of KV {_gib(seq_bytes)} = "
            f"{_gib(router_need)} > usable {_gib(usable)} ({p.usable_fraction:.0%}); use {hint}")
    got: tuple[int, int] | str = ""
    for nodes in ([p.nodes] if p.nodes else range(1, 257)):
        got = _choose(cfg, p, nodes, wb, usable)
        if isinstance(got, tuple):
            break
    if isinstance(got, str):
        reasons.append(got if p.nodes else f"no layout up to 256 nodes: {got}")
    if reasons:
        where = f"{p.nodes} node(s)" if p.nodes else "any number of nodes"
        raise LayoutError(f"{cfg.name or 'model'} ({p.weights}) does not fit on {where} of {p.gpus_per_node} x "
                          f"{p.gpu_mem_gib:g} GiB GPUs: " + "; and ".join(reasons))
    R, S = got
    E = cfg.n_routed_experts
    eps = math.ceil(E / S)
    shard_w = eps * wb.per_expert_layer * wb.moe_layers
    s_reserve = shard_reserve(cfg, p, R, S)
    kv_pool = usable - wb.router - r_reserve
    cap = capacity(cfg, kv_pool, p.kv_dtype, p.context, p.block_size)
    max_seqs = min(cap.max_seqs, p.max_num_seqs)
    pods = pod_placement(R, S, p.gpus_per_node)
    return {
        "model": cfg.name, "weights": p.weights, "kv_dtype": p.kv_dtype, "context": p.context, "mtp": p.mtp,
        "params": asdict(counts),
        "pool": {"nodes": nodes, "gpus_per_node": p.gpus_per_node, "gpu_mem_bytes": int(p.gpu_mem_gib * GIB),
                 "usable_fraction": p.usable_fraction, "usable_bytes": usable},
        "layout": {"routers": R, "expert_shards": S, "experts_per_shard": eps,
                   "last_shard_experts": E - eps * (S - 1) if E % S else eps,
                   "router_pods": pods["router_pods"], "expert_pods": pods["expert_pods"],
                   "colocated": pods["colocated"], "placement_strategy": pods["strategy"],
                   "gpus_used": R + S, "gpus_idle": nodes * p.gpus_per_node - R - S},
        "weight_bytes": {"router_dense": wb.router, "per_expert_layer": wb.per_expert_layer,
                         "moe_layers": wb.moe_layers, "total": wb.total},
        "router_gpu": {"weights": wb.router, "activation_reserve": r_reserve, "kv_pool": kv_pool,
                       "free": usable - wb.router - r_reserve - kv_pool},
        "shard_gpu": {"weights": shard_w, "activation_reserve": s_reserve, "free": usable - shard_w - s_reserve},
        "kv": {"bytes_per_token": kb.per_token, "fixed_bytes_per_sequence": kb.fixed_per_seq,
               "sequence_bytes": seq_bytes, "block_size": kb.block_size,
               "tokens_per_router": cap.max_tokens, "sequences_per_router": cap.max_seqs,
               "tokens_total": cap.max_tokens * R, "sequences_total": cap.max_seqs * R},
        # one GPU per rank, the KV pool in the format its size was planned for
        "serve_args": {"num_routers": R, "num_expert_shards": S, "gpus_per_router": 1, "gpus_per_shard": 1,
                       "device": "cuda", "kv_cache_dtype": p.kv_dtype, "kv_cache_bytes": kv_pool, "dtype": "bfloat16",
                       "max_num_seqs": max(1, max_seqs), "max_model_len": p.context,
                       "max_num_batched_tokens": p.max_num_batched_tokens},
    }


def format_layout(plan: dict) -> str:
    c, L, pool = plan["params"], plan["layout"], plan["pool"]
    wb, rg, sg, kv = plan["weight_bytes"], plan["router_gpu"], plan["shard_gpu"], plan["kv"]
    B = lambda n: f"{n / 1e9:,.1f}B"  # noqa: E731
    usable = pool["usable_bytes"]
    lines = [
        f"model {plan['model']}: {B(c['total'])} parameters ({B(c['total_with_mtp'])} with MTP), {B(c['active'])} "
        f"active per token",
        f"  dense {B(c['dense'])} + routed experts {B(c['routed'])} ({c['moe_layers']} layers x "
        f"{c['routed'] // max(1, c['per_expert'] * c['moe_layers'])} x {c['per_expert'] / 1e6:,.1f}M) + embedding "
        f"{B(c['embedding'])} + head {B(c['head'])}; MTP {B(c['mtp'])}",
        f"weights {plan['weights']}{' (with MTP)' if plan['mtp'] else ''}: {_gib(wb['total'])} "
        f"(router dense {_gib(wb['router_dense'])}, one expert-layer {wb['per_expert_layer']:,} B)",
        f"pool: {pool['nodes']} node(s) x {pool['gpus_per_node']} GPUs x {pool['gpu_mem_bytes'] / GIB:g} GiB; "
        f"usable {pool['usable_fraction']:.0%} = {_gib(usable)} per GPU",
        f"layout: {L['routers']} router(s) + {L['expert_shards']} expert shard(s) = {L['gpus_used']} GPUs"
        + (f" ({L['gpus_idle']} idle)" if L["gpus_idle"] else "")
        + f"; {L['experts_per_shard']} experts per shard"
        + (f" (last shard {L['last_shard_experts']})" if L["last_shard_experts"] != L["experts_per_shard"] else ""),
        (f"  one pod of {L['router_pods']['gpus_per_pod']} GPUs holds routers and expert shards; placement "
         f"{L['placement_strategy']}" if L["colocated"] else
         f"  router pods {L['router_pods']['replicas']} x {L['router_pods']['gpus_per_pod']} GPUs, expert pods "
         f"{L['expert_pods']['replicas']} x {L['expert_pods']['gpus_per_pod']} GPUs; placement "
         f"{L['placement_strategy']}"),
        f"router GPU: dense weights {_gib(rg['weights'])} + activation reserve {_gib(rg['activation_reserve'])} + "
        f"KV pool {_gib(rg['kv_pool'])} = {_gib(usable)}",
        f"shard GPU:  {L['experts_per_shard']} experts x {wb['moe_layers']} layers x {wb['per_expert_layer']:,} B = "
        f"{_gib(sg['weights'])} + activation reserve {_gib(sg['activation_reserve'])}; free {_gib(sg['free'])}",
        f"KV ({plan['kv_dtype']}): {kv['bytes_per_token']:,.0f} B/token + {kv['fixed_bytes_per_sequence']:,} B fixed "
        f"per sequence; one {plan['context']:,}-token sequence = {_gib(kv['sequence_bytes'], 2)}",
        f"  per router: {kv['tokens_per_router']:,} tokens, {kv['sequences_per_router']:,} sequences at "
        f"{plan['context']:,}; replica: {kv['tokens_total']:,} tokens, {kv['sequences_total']:,} sequences",
    ]
    return "\n".join(lines)


def helm_values(plan: dict, model_path: str) -> dict:
    """Overrides for helm/v4ray/values.yaml that deploy this layout. The chart sizes each pod's GPUs from the
    args (ranks per pod x gpus_per_router / gpus_per_shard); expertShards.replicas 0 puts the shards in the
    router pod (a replica that fits one node)."""
    L = plan["layout"]
    return {
        "serve": {"args": {"model": model_path, **plan["serve_args"]}},
        "workers": {"routers": {"replicas": L["router_pods"]["replicas"]},
                    "expertShards": {"replicas": L["expert_pods"]["replicas"]}},
    }


def emit_values(plan: dict, model_path: str, command: str = "") -> str:
    import yaml

    header = [f"# Generated by: {command}" if command else "# Generated by v4ray plan layout",
              *("# " + line for line in format_layout(plan).splitlines())]
    return "\n".join(header) + "\n" + yaml.safe_dump(helm_values(plan, model_path), sort_keys=False)


def add_layout_parser(plan_sub) -> None:
    """`v4ray plan layout` under the CLI's `plan` subparsers."""
    lp = plan_sub.add_parser("layout", help="routers, expert shards, memory per GPU and KV capacity on a GPU pool; "
                                            "emits Helm values")
    lp.add_argument("--model", required=True, help="a preset, a config.json or a checkpoint directory")
    lp.add_argument("--gpu-mem-gib", type=float, required=True, help="memory of one GPU in GiB (e.g. 140)")
    lp.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node (e.g. 8)")
    lp.add_argument("--nodes", type=int, default=None, help="nodes to use (default: the fewest that fit)")
    lp.add_argument("--context", type=int, default=131072, help="context length in tokens (default 131072)")
    lp.add_argument("--weights", default="fp8-dense-fp4-experts", choices=WEIGHT_FORMATS,
                    help="weight format in GPU memory (default fp8-dense-fp4-experts, as DeepSeek ships them)")
    lp.add_argument("--kv-cache-dtype", "--kv-dtype", dest="kv_dtype", default="fp8", choices=["fp8", "bf16"],
                    help="KV-cache storage the memory is planned for; emitted as serve.args.kv_cache_dtype "
                         "(default fp8)")
    lp.add_argument("--usable-fraction", type=float, default=0.90, help="usable share of GPU memory (default 0.90)")
    lp.add_argument("--max-num-batched-tokens", type=int, default=8192, help="tokens per router step (default 8192)")
    lp.add_argument("--max-num-seqs", type=int, default=64, help="cap on running sequences per router (default 64)")
    lp.add_argument("--block-size", type=int, default=None, help="tokens per KV block (default: derived from the rates)")
    lp.add_argument("--expert-shards", type=int, default=None, help="force the number of expert shards")
    lp.add_argument("--mtp", action="store_true", help="also hold the MTP block's weights")
    lp.add_argument("--model-path", default=None,
                    help="checkpoint path inside the pods for --emit-values (default /models/<model name>)")
    lp.add_argument("--json", action="store_true")
    lp.add_argument("--emit-values", metavar="FILE", default=None, help="write Helm values for helm/v4ray ('-': stdout)")
    lp.set_defaults(func=run_layout_cli)


def run_layout_cli(args) -> int:
    import json
    import os
    import sys

    from v4ray.model.config import resolve_config

    cfg = resolve_config(args.model)
    p = PlanInput(gpu_mem_gib=args.gpu_mem_gib, gpus_per_node=args.gpus_per_node, nodes=args.nodes,
                  context=args.context, weights=args.weights, kv_dtype=args.kv_dtype,
                  usable_fraction=args.usable_fraction, max_num_batched_tokens=args.max_num_batched_tokens,
                  max_num_seqs=args.max_num_seqs, block_size=args.block_size, mtp=args.mtp,
                  expert_shards=args.expert_shards)
    plan = plan_layout(cfg, p)
    if args.emit_values:
        name = os.path.basename(os.path.normpath(cfg.name or str(args.model)))
        if name == "config.json":
            name = os.path.basename(os.path.dirname(os.path.abspath(cfg.name)))
        cmd = "v4ray plan layout " + " ".join(a for a in sys.argv[3:]) if sys.argv[1:3] == ["plan", "layout"] else ""
        text = emit_values(plan, args.model_path or f"/models/{name}", cmd)
        if args.emit_values == "-":
            sys.stdout.write(text)
            return 0
        with open(args.emit_values, "w") as f:
            f.write(text)
    print(json.dumps(plan, indent=2) if args.json else format_layout(plan))
    return 0
