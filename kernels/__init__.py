"""Hot ops of the V4 forward, one dispatch function each. Today each is backed by its torch reference;
Triton kernels slot in behind the same functions."""

from .attention import sink_attention, sparse_sink_attention
from .compressor import compress_pool
from .indexer import indexer_topk, indexer_topk_padded
from .mhc import mhc_weights
from .moe import expert_mlp
from .quant import QuantTensor

__all__ = ["sink_attention", "sparse_sink_attention", "indexer_topk_padded", "compress_pool", "indexer_topk", "mhc_weights", "expert_mlp", "QuantTensor"]
