"""SwiftKV's least-squares initialisation (`swiftkv convert --init lsq`): on a random Llama it predicts the
teacher's keys and values better than the copy-init and starts closer to the teacher on held-out text; at l = L
it changes nothing; an AcrossKV group's shared projection is the joint fit over the group; bad calibration input
is a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from glassbox.checkpoints.hf_format import save_hf_model_dir
from glassbox.checkpoints.hf_swiftkv import convert, load_swiftkv_model_dir
from glassbox.cli import main
from glassbox.data.config import DataConfig
from glassbox.data.sampler import build_sampler
from glassbox.errors import GlassboxError
from glassbox.models.swiftkv import (
    KVLeastSquares,
    SwiftKVConfig,
    kv_reconstruction_error,
    lsq_init,
    swiftkv_from_base,
    teacher_layer_inputs,
)
from glassbox.models.transformer import ModelConfig, Transformer
from glassbox.train.distill import heldout_kl


def random_llama(layers: int = 4) -> Transformer:
    """Weights large enough (init_std 0.08) that the layers' inputs drift apart, as a trained model's do."""
    torch.manual_seed(7)
    return Transformer(ModelConfig(vocab_size=512, hidden_size=64, num_layers=layers, num_heads=4, num_kv_heads=2,
                                   intermediate_size=128, max_seq_len=128, init_std=0.08)).eval()


@pytest.fixture(scope="module")
def base_dir(prepared_data, tmp_path_factory) -> Path:
    return save_hf_model_dir(random_llama(), tmp_path_factory.mktemp("base") / "base",
                             tokenizer_json=prepared_data / "tokenizer.json")


def held_out(data_dir: Path, rows: int = 8) -> torch.Tensor:
    """Samples of the valid split: documents the calibration (the train split) never saw."""
    return build_sampler(DataConfig(path=str(data_dir), seq_len=64, seed=0), "valid").samples(0, rows)


def test_lsq_init_beats_copy_init_on_held_out_text(base_dir, prepared_data, tmp_path):
    held = held_out(prepared_data)
    # (l, g, how much lower than the copy-init's): an AcrossKV group's members differ, which no shared projection
    # can fit, so there the least-squares part is a smaller share of the error.
    for layer, group, margin in ((2, 1, 0.9), (1, 3, 0.98)):
        dirs = {init: convert(base_dir, layer, group, tmp_path / f"{init}{layer}", init=init,
                              calib=str(prepared_data) if init == "lsq" else None, calib_tokens=2048)
                for init in ("copy", "lsq")}
        models = {init: load_swiftkv_model_dir(d)[0] for init, d in dirs.items()}
        err = {init: kv_reconstruction_error(m, held[:, :-1]) for init, m in models.items()}
        kl = {init: heldout_kl(m, held, [], eod_id=0) for init, m in models.items()}
        for kind in ("k", "v"):
            assert err["lsq"][kind] < margin * err["copy"][kind], (layer, group, err)
        assert kl["lsq"] < margin * kl["copy"], (layer, group, kl)
        record = json.loads((dirs["lsq"] / "config.json").read_text())["swiftkv_init"]
        assert record == {"method": "lsq", "fitted": ["k_proj", "v_proj"], "calib": str(prepared_data),
                          "calib_tokens": 2048, "ridge": 1e-4}
        assert json.loads((dirs["copy"] / "config.json").read_text())["swiftkv_init"] == {"method": "copy"}
        # The norm and the Q projections keep their copies; only K/V are refit.
        for name, p in models["copy"].state_dict().items():
            assert torch.equal(p, models["lsq"].state_dict()[name]) != name.startswith(("swiftkv_k", "swiftkv_v"))


def test_lsq_at_the_last_layer_is_the_base_model(base_dir, prepared_data, tmp_path):
    out = tmp_path / "skv"
    assert main(["swiftkv", "convert", str(base_dir), "--layer", "4", "--init", "lsq", "--calib", "stdlib",
                 "--calib-tokens", "512", "--out", str(out)]) == 0
    model, _ = load_swiftkv_model_dir(out)
    ids = held_out(prepared_data, 2)[:, :-1]
    with torch.no_grad():
        assert torch.equal(model(ids), model(ids, swiftkv=False))
    assert json.loads((out / "config.json").read_text())["swiftkv_init"]["calib_tokens"] == 0


def test_across_kv_shares_the_joint_fit_of_its_group():
    """One projection for layers 2 and 3: lsq_init's (the fit to the mean target) equals the least-squares fit
    to both layers' targets stacked, solved independently."""
    base = random_llama()
    calib = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(3))
    model = swiftkv_from_base(base, SwiftKVConfig(2, 2))
    assert lsq_init(model, calib.split(4), ridge=0.0) == calib.numel()
    assert list(model.swiftkv_k_proj) == list(model.swiftkv_v_proj) == ["2"]
    with torch.no_grad():
        h = dict(teacher_layer_inputs(base, calib))
        n = model.swiftkv_norm(h[2]).flatten(0, 1).double()
        for kind in ("k", "v"):
            targets = [getattr(base.layers[j].self_attn, f"{kind}_proj")(base.layers[j].input_layernorm(h[j]))
                       for j in (2, 3)]
            stacked = torch.linalg.lstsq(torch.cat([n, n]), torch.cat(targets).flatten(0, -2).double()).solution
            got = getattr(model, f"swiftkv_{kind}_proj")["2"].weight.double()
            torch.testing.assert_close(got, stacked.T, rtol=1e-4, atol=1e-5)


def test_bad_calibration_input_is_a_clear_error(base_dir, prepared_data, tmp_path):
    model = swiftkv_from_base(random_llama(), SwiftKVConfig(2))
    with pytest.raises(GlassboxError, match="40 calibration tokens, fewer than the hidden size 64"):
        lsq_init(model, [torch.zeros(1, 40, dtype=torch.long)])
    with pytest.raises(GlassboxError, match="0 calibration tokens"):
        lsq_init(model, [])
    fit = KVLeastSquares(model)
    fit.add(torch.zeros(2, 64, dtype=torch.long))     # one token repeated: n n^T has rank 1
    with pytest.raises(GlassboxError, match="singular at --ridge 0"):
        fit.solve(0.0)
    with pytest.raises(GlassboxError, match="--init lsq needs --calib"):
        convert(base_dir, 2, 1, tmp_path / "a", init="lsq")
    with pytest.raises(GlassboxError, match="--calib is for --init lsq"):
        convert(base_dir, 2, 1, tmp_path / "a", calib="stdlib")
    with pytest.raises(GlassboxError, match="--calib: source 'nowhere.txt': no such file"):
        convert(base_dir, 2, 1, tmp_path / "a", init="lsq", calib="nowhere.txt")
    with pytest.raises(GlassboxError, match="fewer than the hidden size 64"):
        convert(base_dir, 2, 1, tmp_path / "a", init="lsq", calib="stdlib", calib_tokens=32)
    assert main(["swiftkv", "convert", str(base_dir), "--layer", "2", "--init", "lsq", "--out",
                 str(tmp_path / "b")]) == 2
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_data_dir_of_another_tokenizer_is_refused(base_dir, tmp_path):
    from glassbox.data.prepare import prepare

    other = prepare(["stdlib"], tmp_path / "other", vocab_size=300, max_bytes=40_000, progress=False).out
    with pytest.raises(GlassboxError, match="its tokenizer.json is not the model's"):
        convert(base_dir, 2, 1, tmp_path / "a", init="lsq", calib=str(other))
