"""v4ray: serve DeepSeek-V4 on Ray. The public API, imported lazily (`from v4ray import LLM, SamplingParams`)."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]


def __getattr__(name: str):
    if name == "LLM":
        from v4ray.cluster.llm import LLM
        return LLM
    if name == "SamplingParams":
        from v4ray.engine.sampling import SamplingParams
        return SamplingParams
    if name in ("RequestOutput", "CompletionOutput"):
        from v4ray.engine import outputs
        return getattr(outputs, name)
    raise AttributeError(f"module 'v4ray' has no attribute {name!r}")
