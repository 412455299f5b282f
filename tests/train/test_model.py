"""The model's math: causality, GQA, tied weights, MoE routing and its balance loss, the LR schedule, batch plans."""

from __future__ import annotations

import math

import pytest
import torch

from glassbox.train.step_plan import ScheduledPlan, build_step_plan
from glassbox.train.config import BatchConfig, BatchStage, OptimizerConfig, ScheduleConfig
from glassbox.train.lr_schedule import build_lr_schedule
from glassbox.models.transformer import MoE, ModelConfig, Transformer


def small(**kw) -> ModelConfig:
    base = dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48,
                max_seq_len=32)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("experts", [0, 4])
def test_causal_the_past_ignores_the_future(experts):
    torch.manual_seed(0)
    model = Transformer(small(num_experts=experts)).eval()
    x = torch.randint(0, 97, (2, 16))
    y = x.clone()
    y[:, 10:] = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        a, b = model(x), model(y)
    assert a.shape == (2, 16, 97)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_tied_embeddings_share_one_tensor():
    tied, untied = Transformer(small()), Transformer(small(tie_embeddings=False))
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert untied.lm_head.weight is not untied.embed_tokens.weight
    assert sum(p.numel() for p in tied.parameters()) == small().num_params()
    assert sum(p.numel() for p in untied.parameters()) == small(tie_embeddings=False).num_params()


def test_grouped_query_attention_matches_repeated_full_heads():
    """GQA with 2 KV heads equals full attention whose K/V weights repeat each KV head for its query group."""
    torch.manual_seed(0)
    gqa = Transformer(small(num_kv_heads=2)).eval()
    full = Transformer(small(num_kv_heads=4)).eval()
    state = gqa.state_dict()
    hd = small().head_dim
    for key in list(state):
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            w = state[key].view(2, hd, -1)
            state[key] = w.repeat_interleave(2, dim=0).reshape(4 * hd, -1)
    full.load_state_dict(state)
    x = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        assert torch.allclose(gqa(x), full(x), atol=1e-5)


def test_moe_matches_a_per_token_reference_and_runs_under_bf16_autocast():
    torch.manual_seed(0)
    cfg = small(num_experts=4, experts_per_token=2)
    moe = MoE(cfg)
    for p in (moe.gate_proj, moe.up_proj, moe.down_proj):
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(10, 32)
    out = moe(x)
    probs, weights, experts = moe.route(x)
    ref = torch.zeros_like(x)
    for t in range(10):
        for w, e in zip(weights[t], experts[t]):
            h = torch.nn.functional.silu(x[t] @ moe.gate_proj[e].T) * (x[t] @ moe.up_proj[e].T)
            ref[t] += w * (h @ moe.down_proj[e].T)
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(weights.sum(-1), torch.ones(10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert moe(x).dtype == torch.float32  # the residual stream's dtype, whatever the experts ran in


def test_moe_aux_loss_pulls_a_collapsed_router_back_to_balance():
    """Start with a router that sends every token to experts 0 and 1; minimising only the balance loss spreads
    the load over all experts (the loss is minimal, 1.0, at a uniform load)."""
    torch.manual_seed(0)
    cfg = small(num_experts=4, experts_per_token=2)
    moe = MoE(cfg)
    for p in (moe.gate_proj, moe.up_proj, moe.down_proj):
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(512, 32) + 1.0
    with torch.no_grad():
        moe.router.weight.normal_(std=0.01)
        moe.router.weight[:2] += 0.1
    moe(x)
    before = moe.last_expert_load.clone()
    opt = torch.optim.Adam(moe.router.parameters(), lr=0.01)
    for _ in range(150):
        moe(x)
        opt.zero_grad()
        moe.last_aux_loss.backward()
        opt.step()
    moe(x)
    after = moe.last_expert_load
    assert before.max() > 0.45 and before.min() < 0.05
    assert after.max() < 0.27 and after.min() > 0.23
    assert moe.last_aux_loss.item() < 1.02


def test_warmup_then_cosine_to_min_lr():
    sched = build_lr_schedule(OptimizerConfig(lr=1e-3, min_lr=1e-4), ScheduleConfig(steps=20, warmup_steps=4), 8)
    lrs = [sched.lr(8 * i) for i in range(20)]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[-1] == pytest.approx(1e-4)
    mid = 4 + 15 / 2
    assert lrs[int(mid)] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * (int(mid) - 4) / 15)))
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))


def test_batch_plans():
    assert build_step_plan(BatchConfig(global_batch_size=8)).spec(1000).global_batch == 8
    plan = build_step_plan(BatchConfig(global_batch_size=8, schedule=[BatchStage(3, 16, 1.5), BatchStage(5, 4)]))
    assert isinstance(plan, ScheduledPlan)
    assert [plan.spec(s).global_batch for s in range(1, 7)] == [8, 8, 16, 16, 4, 4]
    assert [plan.spec(s).lr_scale for s in range(1, 7)] == [1, 1, 1.5, 1.5, 1, 1]
    other = build_step_plan(BatchConfig(global_batch_size=2, schedule=[BatchStage(1, 2)]))
    other.load_state_dict(plan.state_dict())
    assert [other.spec(s).global_batch for s in range(1, 7)] == [8, 8, 16, 16, 4, 4]
