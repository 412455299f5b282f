"""Serving's joined projection weights (Transformer.fuse_projections): the same logits, no memory added, the same
state_dict, and weights loaded afterwards reach the joined matrix; dense and MoE models."""

from __future__ import annotations

import pytest
import torch

from glassbox.models.transformer import ModelConfig, SwiGLU, Transformer


def tiny(**moe) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96,
                      max_seq_len=32, **moe)
    return Transformer(cfg).eval()


def storage_bytes(model: torch.nn.Module) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in list(model.parameters()) + list(model.buffers())}
    return sum(storages.values())


@pytest.mark.parametrize("moe", [{}, {"num_experts": 4, "experts_per_token": 2}], ids=["dense", "moe"])
def test_fused_projections_change_nothing_but_the_number_of_products(moe):
    model = tiny(**moe)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        before = model(ids)
    keys, params, nbytes = list(model.state_dict()), sum(p.numel() for p in model.parameters()), storage_bytes(model)
    model.fuse_projections()
    model.fuse_projections()                                    # a second call changes nothing
    attn = model.layers[0].self_attn
    assert attn.qkv_weight.shape == (64 + 2 * 32, 64)
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.qkv_weight.untyped_storage().data_ptr()
    assert torch.equal(attn.qkv_weight[64:96], attn.k_proj.weight)
    mlp = model.layers[0].mlp
    if moe:
        assert not isinstance(mlp, SwiGLU)                      # its experts stay as they are
    else:
        assert mlp.gate_up_weight.shape == (2 * 96, 64)
    assert list(model.state_dict()) == keys and sum(p.numel() for p in model.parameters()) == params
    assert storage_bytes(model) == nbytes                       # views of the joined matrices: nothing copied
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, rtol=1e-5, atol=1e-5)


def test_weights_loaded_into_a_fused_model_reach_its_joined_matrices():
    source, model = tiny(), tiny()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.fuse_projections()
    model.load_state_dict(source.state_dict())
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), source(ids), rtol=1e-5, atol=1e-5)
    assert torch.equal(model.layers[1].mlp.gate_up_weight[96:], source.layers[1].mlp.up_proj.weight)


def linear_calls(model: Transformer, ids: torch.Tensor) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(ids).sum().backward() if torch.is_grad_enabled() else model(ids)
    return sum(e.count for e in prof.key_averages() if e.key == "aten::linear")


def test_a_fused_model_serves_with_one_product_and_still_trains_through_the_separate_ones():
    model, ids = tiny(), torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        separate = linear_calls(model, ids)
    model.fuse_projections()
    with torch.no_grad():
        assert linear_calls(model, ids) == separate - 2 * (2 + 1) == 2 * 4 + 1     # q/k/v -> 1, gate/up -> 1
    assert linear_calls(model, ids) == separate                 # with gradients: the separate, tracked weights
    attn = model.layers[0].self_attn
    assert attn.k_proj.weight.grad is not None and model.layers[0].mlp.up_proj.weight.grad is not None
