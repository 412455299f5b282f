"""Registers glassbox's own transformers model type (`glassbox_moe`) with transformers' Auto classes.

glassbox/hf_models.py runs `register_config` once transformers' configuration Auto module is loaded and
`register_model` once its modeling one is, so that after `import glassbox` both know the type, with no
trust_remote_code.
"""

from __future__ import annotations


def register_config() -> None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING, AutoConfig

    from glassbox.models.hf_moe_config import MODEL_TYPE, GlassboxMoeConfig

    if MODEL_TYPE not in CONFIG_MAPPING:
        AutoConfig.register(MODEL_TYPE, GlassboxMoeConfig)


def register_model() -> None:
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )
    from transformers.models.auto.modeling_auto import AutoModelForCausalLM

    from glassbox.models.hf_moe import GlassboxMoeConfig, GlassboxMoeForCausalLM
    from glassbox.models.hf_moe_config import MODEL_TYPE

    AutoModelForCausalLM.register(GlassboxMoeConfig, GlassboxMoeForCausalLM, exist_ok=True)
    # The on-disk layout is Mixtral's (one tensor per expert); transformers fuses it in memory by model type.
    register_checkpoint_conversion_mapping(MODEL_TYPE, get_checkpoint_conversion_mapping("mixtral"), overwrite=True)
