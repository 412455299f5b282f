"""`--experts-keep auto`: the candidates span [1 - S, 1] with 1.0 (plain Wanda) among them, the held-out windows
are disjoint from the fit ones, the lowest held-out loss wins (ties: the larger fraction), and STUN at the chosen
fraction is what the report says and the CLI prints; keep 1.0 is exactly Wanda alone."""

from __future__ import annotations

import json

import pytest
import torch

from glassbox.checkpoints.hf_format import load_hf_model_dir
from glassbox.cli import main
from glassbox.errors import GlassboxError
from glassbox.models.loss import mean_next_token_loss
from glassbox.pruning.auto_keep import candidate_keeps, choose_keep, split_windows
from glassbox.pruning.calibration import token_windows
from glassbox.pruning.expert_drop import drop_experts
from glassbox.pruning.prune import PruneOptions, parse_experts_keep, prune


@pytest.fixture(scope="module")
def model_and_calib(moe_dir, prepared_data):
    model, cfg = load_hf_model_dir(moe_dir, dtype=torch.float32)
    return model, token_windows(prepared_data, 16, 64, seed=0, vocab_size=cfg.vocab_size)


@pytest.mark.parametrize("sparsity", [0.0, 0.2, 0.4, 0.6])
def test_candidates_span_one_minus_s_to_one_with_distinct_counts(sparsity):
    keeps = candidate_keeps(sparsity, total=128, floor=16)
    assert keeps[0] == 1.0 and keeps == sorted(keeps, reverse=True)
    assert all(1.0 - sparsity - 1e-12 <= k <= 1.0 for k in keeps)
    counts = [round(k * 128) for k in keeps]
    assert len(set(counts)) == len(counts)
    assert (sparsity == 0.0) == (len(keeps) == 1)
    assert min(keeps) == pytest.approx(1.0 - sparsity)


def test_candidates_below_the_top_k_floor_are_skipped():
    keeps = candidate_keeps(0.9, total=16, floor=4)
    assert all(round(k * 16) >= 4 for k in keeps) and 1.0 in keeps and min(keeps) > 0.1


@pytest.mark.parametrize("n", [2, 5, 16])
def test_held_out_windows_are_an_interleaved_quarter_disjoint_from_the_fit(n):
    windows = torch.arange(n)[:, None].repeat(1, 3)
    fit, held = split_windows(windows)
    assert sorted(fit[:, 0].tolist() + held[:, 0].tolist()) == list(range(n))
    assert len(held) == max(1, -(-n // 4)) and n - 1 in held[:, 0].tolist()


def test_auto_needs_two_windows():
    with pytest.raises(GlassboxError, match="at least 2 calibration windows"):
        split_windows(torch.zeros(1, 8, dtype=torch.long))


def test_a_clearly_better_candidate_wins_and_ties_go_to_the_larger_fraction(model_and_calib):
    model, calib = model_and_calib
    _, held = split_windows(calib)
    half = drop_experts(model, [list(range(4)) for _ in model.layers])
    assert mean_next_token_loss(half, held, 8) > mean_next_token_loss(model, held, 8)
    # 0.75 and 1.0 always tie: 1.0 must win; the unpruned model offered as 0.5 is better on every window.
    for at_half, other, chosen in ((half, model, 1.0), (model, half, 0.5)):
        keep, search = choose_keep(lambda k: at_half if k == 0.5 else other, held, [1.0, 0.75, 0.5], 8)
        assert keep == chosen and search["chosen"] == keep
        assert [c["keep"] for c in search["candidates"]] == [1.0, 0.75, 0.5]
        assert search["candidates"][1]["gain"] == 0.0


def test_a_gain_within_the_noise_of_the_windows_keeps_every_expert():
    from glassbox.pruning.auto_keep import significant_best

    ref = torch.tensor([2.0, 2.4, 1.8, 2.2, 2.1, 1.9, 2.3, 2.0], dtype=torch.float64)
    noisy = ref + torch.tensor([-0.02, 0.015, -0.018, 0.012, -0.01, 0.011, -0.016, 0.02], dtype=torch.float64)
    steady = ref - 0.01
    scored = [{"keep": 1.0, "heldout_loss": float(ref.mean())}, {"keep": 0.9, "heldout_loss": float(noisy.mean())}]
    assert scored[1]["heldout_loss"] < scored[0]["heldout_loss"]                 # lower in the mean ...
    assert significant_best(scored, [ref, noisy]) == 0                           # ... but not beyond its noise
    assert scored[1]["gain"] == pytest.approx(0.00075) and scored[1]["gain"] < 2 * scored[1]["gain_se"]
    scored.append({"keep": 0.8, "heldout_loss": float(steady.mean())})
    assert significant_best(scored, [ref, noisy, steady]) == 2                   # 0.01 on every window


def test_stun_at_keep_one_is_wanda_alone(model_and_calib):
    model, calib = model_and_calib
    a, ra = prune(model, calib, PruneOptions("stun", 0.4, experts_keep=1.0))
    b, _ = prune(model, calib, PruneOptions("unstructured", 0.4))
    assert ra.experts_after == ra.experts_before
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_auto_prunes_at_the_significant_candidate_with_the_lowest_held_out_loss(model_and_calib):
    model, calib = model_and_calib
    pruned, report = prune(model, calib, PruneOptions("stun", 0.5, experts_keep="auto"))
    search = report.stage1["keep_search"]
    losses = {c["keep"]: c["heldout_loss"] for c in search["candidates"]}
    allowed = [c["keep"] for c in search["candidates"] if c["keep"] == 1.0 or c["gain"] > 2 * c["gain_se"]]
    assert 1.0 in losses and report.experts_keep == min(allowed, key=lambda k: (losses[k], -k))
    assert search["forward_passes"] == 1 + 2 * len(losses)
    assert sum(report.experts_after) == round(report.experts_keep * sum(report.experts_before))
    assert report.sparsity == pytest.approx(0.5, abs=0.01)
    fixed, _ = prune(model, calib, PruneOptions("stun", 0.5, experts_keep=report.experts_keep))
    sa, sb = pruned.state_dict(), fixed.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_cli_auto_prints_the_chosen_fraction_and_candidates(moe_dir, prepared_data, tmp_path, capsys):
    out = tmp_path / "auto"
    assert main(["prune", "stun", str(moe_dir), "--experts-keep", "auto", "--sparsity", "0.4", "--calib",
                 str(prepared_data), "--calib-samples", "8", "--calib-seq-len", "32", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert f"{summary['experts_keep']:g}" in summary["keep_search"] and "1" in summary["keep_search"]
    assert json.loads((out / "pruning.json").read_text())["experts_keep"] == summary["experts_keep"]


@pytest.mark.parametrize("bad", ["abc", "0", "1.5", "-0.2", "nan"])
def test_bad_experts_keep_is_refused_by_name(bad, moe_dir, prepared_data, tmp_path, capsys):
    with pytest.raises(GlassboxError, match="a number in \\(0, 1\\] or 'auto'"):
        parse_experts_keep(bad)
    assert main(["prune", "stun", str(moe_dir), "--experts-keep", bad, "--sparsity", "0.4",
                 "--calib", str(prepared_data), "--out", str(tmp_path / "o")]) == 2
    assert f"--experts-keep {bad!r}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
