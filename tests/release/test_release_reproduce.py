"""`glassbox reproduce`: the real Trainer replays logged steps and matches the checkpoints bit for bit on CPU."""

from __future__ import annotations

import json

import yaml

from glassbox.cli import main
from glassbox.release.reproduce import from_run, reproduce

from release_helpers import copy_tree, run_on_other_data


def test_replay_from_previous_checkpoint_is_bit_exact(tiny_run, capsys):
    assert main(["reproduce", "--run", str(tiny_run), "--step", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("bit-exact: replayed steps 3..4; all ")
    logged = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert f"logged {logged[3]['loss']:.8g} (diff 0)" in out


def test_replay_from_the_initialisation_is_bit_exact(tiny_run):
    result = reproduce(from_run(tiny_run), 1)
    assert result.bit_exact and result.from_step == 0 and result.max_abs_diff == 0.0
    assert result.tensors_compared > 20      # weights and both Adam moments of every parameter
    assert result.loss_diff == 0.0


def test_replay_from_a_release_is_bit_exact_and_leaves_it_intact(built_release, capsys):
    assert main(["reproduce", "--release", str(built_release), "--step", "2"]) == 0
    assert capsys.readouterr().out.startswith("bit-exact: replayed steps 2..2")
    assert main(["release", "verify", str(built_release)]) == 0


def test_changed_training_math_is_reported_with_the_differences(tiny_run, tmp_path, capsys):
    run = copy_tree(tiny_run, tmp_path / "run")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["optimizer"]["grad_clip"] = 1e-4          # different updates from the same data
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["reproduce", "--run", str(run), "--step", "4"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("not bit-exact: replayed steps 3..4;") and "max abs diff" in out
    result = reproduce(from_run(run), 4)
    assert 0 < result.max_abs_diff < 1 and result.loss_diff > 0


def test_bad_input_is_a_clear_error(tiny_run, prepared_data, tmp_path, capsys):
    assert main(["reproduce", "--run", str(tiny_run), "--step", "3"]) == 2
    assert "no checkpoint at step 3 to compare with (checkpoints: 1, 2, 4)" in capsys.readouterr().err
    assert main(["reproduce", "--run", str(tmp_path), "--step", "1"]) == 2
    assert "config.yaml is missing" in capsys.readouterr().err
    # the run's data changed: the checkpoint's sampler state refuses it before any step is replayed
    run = run_on_other_data(tiny_run, prepared_data, tmp_path)
    assert main(["reproduce", "--run", str(run), "--step", "4"]) == 2
    assert "fingerprint" in capsys.readouterr().err
