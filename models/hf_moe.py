"""`glassbox_moe`: a transformers model type for an MoE whose layers differ in expert count or top-k.

An expert-pruned MoE (glassbox.pruning) keeps a different number of experts in each layer; Mixtral's config has one
`num_local_experts` for all of them, so such a model needs its own type. This one is Mixtral's math and Mixtral's
module names, with two per-layer lists in the config; each decoder layer is built from a copy of the config that
holds that layer's counts (the config class is in `hf_moe_config`: reading a config needs no modeling code). The
weights on disk keep Mixtral's per-expert layout, so the same conversion mapping (per-expert `w1/w2/w3` -> fused
in-memory experts) loads them.

Registered with transformers' Auto classes (`glassbox.models.hf_registry`) when glassbox is imported: a directory
of this type loads with `AutoModelForCausalLM.from_pretrained` after `import glassbox`, without trust_remote_code.
Training the transformers model with `output_router_logits` is not supported: transformers' balance loss
concatenates all layers' router logits, which differ in width here.
"""

from __future__ import annotations

from torch import nn
from transformers.models.mixtral.modeling_mixtral import (
    MixtralDecoderLayer,
    MixtralForCausalLM,
    MixtralModel,
    MixtralPreTrainedModel,
    MixtralRMSNorm,
    MixtralRotaryEmbedding,
)

from glassbox.models.hf_moe_config import GlassboxMoeConfig


class GlassboxMoeModel(MixtralModel):
    config_class = GlassboxMoeConfig

    def __init__(self, config: GlassboxMoeConfig):
        # MixtralModel.__init__ would build every layer at one expert count; build each with its own instead.
        MixtralPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            MixtralDecoderLayer(config.for_layer(i), i) for i in range(config.num_hidden_layers)
        )
        self.norm = MixtralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = MixtralRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class GlassboxMoeForCausalLM(MixtralForCausalLM):
    config_class = GlassboxMoeConfig

    def __init__(self, config: GlassboxMoeConfig):
        MixtralPreTrainedModel.__init__(self, config)
        self.model = GlassboxMoeModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.router_aux_loss_coef = config.router_aux_loss_coef
        self.num_experts = config.num_local_experts
        self.num_experts_per_tok = config.num_experts_per_tok
        self.post_init()
