"""glassbox.inference: a paged-KV, continuously batching engine for glassbox models and an OpenAI-compatible server.

`LLM` and `SamplingParams` are imported lazily so `glassbox --help` does not load torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LLM", "SamplingParams", "EngineConfig", "LLMEngine"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from glassbox.inference.llm import LLM

        return LLM
    if name == "SamplingParams":
        from glassbox.inference.sampling_params import SamplingParams

        return SamplingParams
    if name in ("EngineConfig", "LLMEngine"):
        from glassbox.inference import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'glassbox.inference' has no attribute {name!r}")
