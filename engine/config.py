"""EngineConfig: the one description of an engine that every entry point shares — the offline `LLM`, the Serve
deployment (`ServeConfig` extends it), each Router of a distributed replica, and `v4ray score`.

Every engine default is written here once. `cluster.build.build_engine(config)` turns it into the single-process
engine or the distributed one; `engine.build.build_engine_core` builds the in-process core both use.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DTYPES = ("auto", "float32", "bfloat16")
KV_CACHE_DTYPES = ("auto", "fp8", "bf16", "fp32")
KV_CACHE_SERVICE = "v4ray-kv-cache"


def check_custom_resources(field: str, resources: dict[str, float], who: str) -> None:
    """Resources that pin an actor reserving no CPU (the KVCacheService, the ingress): custom names only, finite
    amounts >= 0."""
    for k, v in resources.items():
        if k in ("CPU", "GPU", "memory") or not 0 <= v < float("inf"):
            raise ValueError(f"{field}: {k}={v} is not allowed; name custom resources with finite amounts >= 0 "
                             f"({who} reserves no CPU or GPU)")


REPLICA_CONTROLS = ("compiled_graph", "tasks")


class EngineConfig(BaseModel):
    """Model, dtype, layout, cache and limits of one engine (a model replica)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Checkpoint directory (config.json, tokenizer.json, safetensors).")
    dtype: str = Field("auto", description="Compute dtype: auto (the checkpoint's: bfloat16 unless stored in "
                                           "float32), float32 or bfloat16.")
    device: str = Field("auto", description="Where the model, cache and step run: auto (cuda when this process sees "
                                            "a GPU, else cpu), cpu, cuda or cuda:N.")
    kv_cache_dtype: str = Field("auto", description="KV-cache storage: auto (the compute dtype's: bf16 or fp32), "
                                                    "fp8 (packed e4m3 + scales; docs/v4_model.md §3.1), bf16 or fp32.")
    gpus_per_router: float = Field(0, ge=0, description="GPUs each Router actor (or the single-process engine) "
                                                        "reserves; > 0 runs it on CUDA.")
    gpus_per_shard: float = Field(0, ge=0, description="GPUs each ExpertShard actor reserves; > 0 runs it on CUDA.")
    enforce_eager: bool = Field(False, description="Run every step eagerly. Default: a step's decode rows run "
                                                  "one fixed-shape step, compiled at start-up on the CPU (torch.compile) "
                                                  "or captured per batch bucket as a CUDA graph on a GPU; on the CPU "
                                                  "the prompt chunks' mHC, projections, MoE and attention run as "
                                                  "compiled regions too.")
    keep_quantized: bool = Field(False, description="Keep FP8/FP4 weights as stored (dequantized per use).")
    num_routers: int = Field(1, ge=1, description="Router actors of a distributed replica (attention side).")
    num_expert_shards: int = Field(0, ge=0, description="ExpertShard actors; 0 runs the model in one process "
                                                          "(no all-to-all).")
    kv_cache_bytes: int = Field(256 << 20, gt=0, description="KV-cache bytes per router (or for the process).")
    block_size: int | None = Field(None, ge=1, description="Tokens per KV block; default: the smallest multiple "
                                                           "of lcm(128, compression rates) that is >= 256.")
    max_num_seqs: int = Field(64, ge=1, description="Sequences running at once per router.")
    max_num_batched_tokens: int = Field(2048, ge=1, description="Tokens per engine step (chunked prefill).")
    max_step_rows: int = Field(0, ge=0, description="Running sequences one step advances at most (0: all, vLLM's "
                                                    "policy). Beyond it whole requests take turns, narrow ones first, "
                                                    "none skipped more than 4 steps in a row: wide requests (n > 1) "
                                                    "then cannot stretch every request's step where step time grows "
                                                    "with rows (the CPU). On a GPU decode rows are nearly free: "
                                                    "leave 0.")
    max_model_len: int | None = Field(None, ge=16, description="Context limit, prompt plus generated tokens; "
                                                               "default: the model's max_position_embeddings.")
    enable_prefix_caching: bool = Field(False, description="Reuse cached prompt prefixes via the KVCacheService.")
    prefix_cache_bytes: int = Field(1 << 30, gt=0, description="Memory budget of the KVCacheService.")
    kv_cache_service: str = Field(KV_CACHE_SERVICE, description="Name of the KVCacheService actor.")
    kv_cache_service_resources: dict[str, float] = Field(
        {}, description="Ray resources the KVCacheService asks for when it starts (it reserves no CPU), e.g. a custom "
                        "resource only the head node declares: a service on a host that dies costs every replica "
                        "its cache hits until Ray restarts it elsewhere. Empty: any node.")
    collective_timeout_s: float = Field(60.0, gt=0, description="Timeout of every all-to-all collective.")
    replica_control: str = Field("tasks", description="How a distributed replica drives its ranks each step: tasks "
                                 "(one Ray task per rank per step) or compiled_graph (a Ray Compiled Graph: one "
                                 "shared-memory round trip to every router and shard; opt-in: in Ray 2.60 a rank "
                                 "dying mid-step with ranks on several nodes crashed a raylet, docs/architecture.md "
                                 "§4).")

    ping_pong: bool = Field(False, description="A distributed replica's decode steps as two micro-batches "
                            "(MegaScale-Infer's ping-pong): each router splits its decode batch in two halves and "
                            "runs one's attention while the shards compute the other's experts. Off by itself with "
                            "fewer than 2 requests on every router; no effect in one process. Opt-in: on CPUs "
                            "with gloo it measured slower (twice the collectives per layer; docs/architecture.md "
                            "§4).")

    @field_validator("dtype", "replica_control", "kv_cache_dtype")
    @classmethod
    def _one_of(cls, v: str, info) -> str:
        allowed = {"dtype": DTYPES, "replica_control": REPLICA_CONTROLS,
                   "kv_cache_dtype": KV_CACHE_DTYPES}[info.field_name]
        if v not in allowed:
            raise ValueError(f"{info.field_name} must be one of {list(allowed)}, got {v!r}")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        v = v.strip().lower()
        kind, _, index = v.partition(":")
        if kind not in ("auto", "cpu", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {v!r}")
        return v

    @model_validator(mode="after")
    def _layout(self):
        if self.num_routers > 1 and self.num_expert_shards == 0:
            raise ValueError("num_routers > 1 needs num_expert_shards >= 1 (a distributed replica)")
        check_custom_resources("kv_cache_service_resources", self.kv_cache_service_resources, "the service")
        return self

    def engine_fields(self) -> dict:
        """This config's EngineConfig fields (a subclass's own fields left out)."""
        return {name: getattr(self, name) for name in EngineConfig.model_fields}
