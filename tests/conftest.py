"""Shared fixtures: tiny checkpoints written once per test session, the transformers reference."""

from __future__ import annotations

import os
from pathlib import Path

# Before anything imports Ray: a local cluster on loopback only, no usage reporting.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# torch.compile is off for the suite (it reaches Ray workers too): engines built with the default
# `enforce_eager=False` then run their fixed-shape decode step uncompiled, the same function the compiled step
# traces. A cold inductor compile costs about a minute on 2 cores; tests/test_decode_static.py turns compilation
# back on where it is the subject.
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("OMP_NUM_THREADS", "2")
torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 free right now (for a server a test starts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

SHARED_REFERENCE = REPO.parent / "shared" / "reference"
PARITY_PRESETS = ["v4-tiny", "v4-tiny-swa", "v4-tiny-rates", "v4-tiny-pro"]
# Prompt length for parity: crosses many CSA windows, two HCA windows of 128 and the 128-token window.
PARITY_PROMPT_LEN = 320


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """make_tiny(preset, dtype, seed) -> checkpoint directory, written once per session."""
    from v4ray.model.tiny import make_tiny

    cache: dict = {}

    def get(preset: str = "v4-tiny", dtype: str = "fp32", seed: int = 1, experts_per_file: int = 2,
            confident: bool = False) -> Path:
        key = (preset, dtype, seed, experts_per_file, confident)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"{preset}-{dtype}-{seed}")
            cache[key] = make_tiny(out, preset=preset, dtype=dtype, seed=seed, experts_per_file=experts_per_file,
                                   confident=confident)
        return cache[key]

    return get


SIMULATED_NODES = 3


@pytest.fixture(scope="session")
def ray_cluster():
    """One Ray for the whole session: a `ray.cluster_utils.Cluster` of 3 simulated nodes on 127.0.0.1, each
    with 2 CPUs and one `expert_slot` (so at most one expert shard per node when shards ask for it)."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"expert_slot": 1}})
    for _ in range(SIMULATED_NODES - 1):
        cluster.add_node(num_cpus=2, resources={"expert_slot": 1})
    ray.init(address=cluster.address, namespace="v4ray", log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def ray_session(ray_cluster):
    import ray

    return ray


def parity_prompt(length: int = PARITY_PROMPT_LEN, seed: int = 0) -> torch.Tensor:
    """Random byte tokens (ids 16..271 of the tiny tokenizer) after BOS."""
    ids = torch.randint(16, 272, (length,), generator=torch.Generator().manual_seed(seed))
    ids[0] = 0
    return ids


def load_reference(ckpt: Path, dtype: torch.dtype = torch.float32):
    """transformers' DeepseekV4ForCausalLM on the same files (a test dependency only)."""
    from transformers import DeepseekV4ForCausalLM

    model = DeepseekV4ForCausalLM.from_pretrained(ckpt, dtype=dtype)
    return model.to(dtype).eval()


@torch.no_grad()
def reference_logits(ref, ids: torch.Tensor) -> torch.Tensor:
    """transformers' full forward without cache: [T] -> [T, V] fp32."""
    return ref(ids[None], use_cache=False).logits[0].float()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per position max|out - ref| / max|ref|."""
    return (out.float() - ref.float()).abs().amax(-1) / ref.float().abs().amax(-1)
