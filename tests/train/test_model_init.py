"""The meta-device build equals the eager build bit for bit; activation checkpointing changes memory, not math.

The eager build is the trainer's old path: seed the torch RNG, `Transformer(cfg)` on the host, then parallelize.
`build_model` builds on the meta device, parallelizes, and fills each rank's shards; every weight (each rank's
local shard against the same slice of the eager tensor), the tie of embedding and LM head, the rotary table and
the RNG state after the build must be identical, in one process and on 2 gloo ranks (FSDP2, tensor parallel,
DDP), dense and MoE, tied and untied. Activation checkpointing must give the same loss and gradients bit for
bit (CPU fp32), keep every parameter name and state-dict key, save fewer activations, and stay compiled.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glassbox.config import ConfigError, from_dict
from glassbox.models.transformer import ModelConfig, Transformer, unwrap
from glassbox.train.config import ParallelConfig
from glassbox.train.model_init import build_model
from glassbox.train.parallel import apply_activation_checkpointing, init_world
from distributed import run_distributed

SEED = 3
VARIANTS = {
    "dense-tied": {},
    "dense-untied": {"tie_embeddings": False},
    "moe-tied": {"num_experts": 4},
    "moe-untied": {"num_experts": 4, "tie_embeddings": False},
}
# On 2 ranks: FSDP2 for every variant, tensor parallel (dense: column- and row-wise shards; MoE: attention only),
# DDP, and FSDP2 with activation checkpointing.
LAYOUTS = {f"fsdp-{v}": (v, {}) for v in VARIANTS} | {
    "tp-dense-untied": ("dense-untied", {"tensor_parallel": 2}),
    "tp-moe-tied": ("moe-tied", {"tensor_parallel": 2}),
    "ddp-dense-tied": ("dense-tied", {"data_parallel": "ddp"}),
}


def model_config(variant: str) -> ModelConfig:
    return ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=48, max_seq_len=16, **VARIANTS[variant])


def eager_build(variant: str) -> tuple[Transformer, torch.Tensor]:
    """The reference: the model built at full size on the host, and the RNG state it leaves."""
    torch.manual_seed(SEED)
    model = Transformer(model_config(variant))
    return model, torch.get_rng_state()


def meta_build(variant: str, **parallel) -> tuple[torch.nn.Module, torch.Tensor]:
    cfg = ParallelConfig(device="cpu", **parallel)
    torch.manual_seed(SEED)
    module = build_model(model_config(variant), cfg, init_world(cfg), bf16=False)
    return module, torch.get_rng_state()


def batch() -> torch.Tensor:
    return torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(7))


def loss_and_grads(module: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward/backward of the training loss (next-token cross-entropy plus the MoE balance loss)."""
    tokens = batch()
    logits = module(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    aux = unwrap(module).aux_loss()
    if aux is not None:
        loss = loss + aux
    loss.backward()
    return loss.detach(), {n: local(p.grad).clone() for n, p in unwrap(module).named_parameters()}


def local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_meta_build_is_the_eager_build_bit_for_bit(variant):
    ref, ref_rng = eager_build(variant)
    model, rng = meta_build(variant)
    assert torch.equal(rng, ref_rng)
    assert list(model.state_dict()) == list(ref.state_dict())
    for name, p in ref.named_parameters():
        assert torch.equal(model.get_parameter(name), p), name
    assert (model.lm_head.weight is model.embed_tokens.weight) == ref.config.tie_embeddings
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert torch.equal(model.rotary.inv_freq, ref.rotary.inv_freq)
    with torch.no_grad():
        assert torch.equal(model(batch()), ref(batch()))


def test_materialize_gives_storage_and_keeps_assigned_weights():
    cfg = model_config("dense-tied")
    ref, _ = eager_build("dense-tied")
    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_state_dict(ref.state_dict(), assign=True)
    model.materialize("cpu")
    assert model.lm_head.weight is model.embed_tokens.weight
    for name, p in ref.named_parameters():
        assert torch.equal(model.get_parameter(name), p), name
    with torch.device("meta"):
        model = Transformer(cfg)
    model.materialize("cpu")
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert model.lm_head.weight is model.embed_tokens.weight


@pytest.mark.parametrize("variant", ["dense-tied", "moe-untied"])
def test_activation_checkpointing_same_loss_and_grads_same_keys(variant):
    plain, _ = meta_build(variant)
    checkpointed, _ = meta_build(variant, activation_checkpointing=True)
    assert list(checkpointed.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in checkpointed.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert "layers.0.self_attn.q_proj.weight" in checkpointed.state_dict()
    loss, grads = loss_and_grads(plain)
    ac_loss, ac_grads = loss_and_grads(checkpointed)
    assert torch.equal(ac_loss, loss)
    for name, g in grads.items():
        assert torch.equal(ac_grads[name], g), name


def _saved_bytes(module: torch.nn.Module) -> int:
    """Bytes autograd keeps for the backward of one forward (what checkpointed blocks leave out)."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_and_grads(module)
    return sum(saved)


def test_activation_checkpointing_saves_fewer_activations():
    plain, _ = meta_build("dense-untied")
    checkpointed, _ = meta_build("dense-untied", activation_checkpointing=True)
    assert _saved_bytes(checkpointed) < 0.5 * _saved_bytes(plain)


def test_checkpointed_blocks_stay_compiled():
    """`checkpoint` turns dynamo off when called from an uncompiled frame; the checkpointed forward must not."""
    from torch._dynamo.utils import counters

    model, _ = meta_build("dense-tied")
    loss, grads = loss_and_grads(model)
    model.zero_grad(set_to_none=True)
    apply_activation_checkpointing(model)
    for block in model.layers:
        block.compile(backend="aot_eager")
    counters.clear()
    ac_loss, ac_grads = loss_and_grads(model)
    assert counters["frames"]["ok"] >= 1
    torch.testing.assert_close(ac_loss, loss)
    for name, g in grads.items():
        torch.testing.assert_close(ac_grads[name], g, msg=name)


def test_activation_checkpointing_config_field():
    assert ParallelConfig().activation_checkpointing is False
    assert from_dict(ParallelConfig, {"activation_checkpointing": True}).activation_checkpointing is True
    with pytest.raises(ConfigError, match="parallel.activation_checkpointing"):
        from_dict(ParallelConfig, {"activation_checkpointing": "yes"}, "parallel")


def _build_on_ranks(rank: int) -> dict:
    """Per layout: this rank's local parameter shards (with placements), the tie, the RNG state after the build,
    and for FSDP2 with and without activation checkpointing this rank's loss and local gradient shards."""
    from torch.distributed.tensor import DTensor

    out = {}
    for layout, (variant, parallel) in LAYOUTS.items():
        module, rng = meta_build(variant, **parallel)
        model = unwrap(module)
        shards = {}
        for name, p in model.named_parameters():
            placements = [(pl.__class__.__name__, getattr(pl, "dim", None)) for pl in p.placements] \
                if isinstance(p, DTensor) else []
            shards[name] = (local(p).detach().clone(), placements)
        out[layout] = {"rng": rng, "shards": shards, "tied": model.lm_head.weight is model.embed_tokens.weight}
    for variant in ("dense-tied", "moe-untied"):
        out[f"grads-{variant}"] = [loss_and_grads(meta_build(variant, activation_checkpointing=ac)[0])
                                   for ac in (False, True)]
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    return run_distributed(_build_on_ranks, 2, tmp_path_factory.mktemp("model_init"))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_rank_holds_the_eager_build_shards(layout, two_ranks):
    variant, parallel = LAYOUTS[layout]
    ref, ref_rng = eager_build(variant)
    for rank, result in enumerate(two_ranks):
        got = result[layout]
        assert torch.equal(got["rng"], ref_rng)
        assert got["tied"] == ref.config.tie_embeddings
        assert list(got["shards"]) == [n for n, _ in ref.named_parameters()]
        for name, p in ref.named_parameters():
            shard, placements = got["shards"][name]
            expected = p.detach()
            for kind, dim in placements:
                if kind == "Shard":
                    expected = expected.chunk(2, dim=dim)[rank]
                else:
                    assert kind == "Replicate", (name, placements)
            assert torch.equal(shard, expected), (layout, rank, name, placements)
        sharded = [n for n, (_, pl) in got["shards"].items() if ("Shard", 0) in pl or ("Shard", 1) in pl]
        assert sharded if not layout.startswith("ddp") else not sharded


@pytest.mark.parametrize("variant", ["dense-tied", "moe-untied"])
def test_activation_checkpointing_under_fsdp_same_loss_and_grads(variant, two_ranks):
    for result in two_ranks:
        (loss, grads), (ac_loss, ac_grads) = result[f"grads-{variant}"]
        assert torch.equal(ac_loss, loss)
        for name, g in grads.items():
            assert torch.equal(ac_grads[name], g), name
