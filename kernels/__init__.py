"""Hot ops of the V4 forward, one dispatch function each: a Triton kernel beside its torch reference, chosen per
call by `backend.kernel_backend` (V4RAY_KERNELS=auto|triton|torch; auto = Triton on CUDA tensors)."""

from .attention import sink_attention, sparse_sink_attention, sparse_sink_attention_fp8
from .compressor import compress_pool
from .indexer import indexer_topk, indexer_topk_padded, indexer_topk_padded_fp8, indexer_topk_paged
from .mhc import mhc_weights
from .moe import expert_mlp
from .quant import QuantTensor


def build_native_cpu_kernels() -> None:
    """Build the CPU's native decode kernels (kernels/native_cpu.py) now, at start-up: built at first use, they cost
    a request ~0.2-0.5 s each (a compiled decode step's warm-up builds them anyway; an eager engine's first prefill
    with logit rows reads its last layer as decode rows and would pay for them)."""
    from . import attention_cpu, moe_cpu, paged_cpu
    for build in (attention_cpu._build, moe_cpu._build, paged_cpu._build):
        build()

__all__ = ["sink_attention", "sparse_sink_attention", "sparse_sink_attention_fp8", "indexer_topk_padded",
           "indexer_topk_padded_fp8", "indexer_topk_paged", "compress_pool", "indexer_topk", "mhc_weights",
           "expert_mlp", "QuantTensor", "build_native_cpu_kernels"]
