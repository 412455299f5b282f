"""The config of `glassbox_moe` (glassbox.models.hf_moe): Mixtral's config with per-layer expert counts and top-k.

Kept apart from the modeling code so that reading a config.json (the engine, export checks) does not import
transformers' modeling stack.
"""

from __future__ import annotations

import copy

from huggingface_hub.dataclasses import strict
from transformers.models.mixtral.configuration_mixtral import MixtralConfig

MODEL_TYPE = "glassbox_moe"


@strict
class GlassboxMoeConfig(MixtralConfig):
    """Mixtral's config plus `num_local_experts_per_layer` and `num_experts_per_tok_per_layer`.

    `num_local_experts` and `num_experts_per_tok` hold the largest per-layer values, so code that reads only them
    (sizing, logging) sees an upper bound rather than a wrong count.
    """

    model_type = MODEL_TYPE
    num_local_experts_per_layer: list[int] | None = None
    num_experts_per_tok_per_layer: list[int] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        layers = self.num_hidden_layers
        if self.num_local_experts_per_layer is None:
            self.num_local_experts_per_layer = [self.num_local_experts] * layers
        if self.num_experts_per_tok_per_layer is None:
            self.num_experts_per_tok_per_layer = [self.num_experts_per_tok] * layers
        for name in ("num_local_experts_per_layer", "num_experts_per_tok_per_layer"):
            if len(getattr(self, name)) != layers:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {layers} layers")

    def for_layer(self, layer: int) -> MixtralConfig:
        """A copy whose scalar expert settings are layer `layer`'s, for building that layer's modules."""
        cfg = copy.copy(self)
        cfg.num_local_experts = self.num_local_experts_per_layer[layer]
        cfg.num_experts_per_tok = self.num_experts_per_tok_per_layer[layer]
        return cfg
