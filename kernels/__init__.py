"""Hot ops of the V4 forward, one dispatch function each: a Triton kernel beside its torch reference, chosen per
call by `backend.kernel_backend` (V4RAY_KERNELS=auto|triton|torch; auto = Triton on CUDA tensors)."""

from .attention import sink_attention, sparse_sink_attention, sparse_sink_attention_fp8
from .compressor import compress_pool
from .indexer import indexer_topk, indexer_topk_padded, indexer_topk_padded_fp8, indexer_topk_paged
from .mhc import mhc_weights
from .moe import expert_mlp
from .quant import QuantTensor

__all__ = ["sink_attention", "sparse_sink_attention", "sparse_sink_attention_fp8", "indexer_topk_padded",
           "indexer_topk_padded_fp8", "indexer_topk_paged", "compress_pool", "indexer_topk", "mhc_weights",
           "expert_mlp", "QuantTensor"]
