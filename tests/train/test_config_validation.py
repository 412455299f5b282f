"""Config values that pass a type check but would break a run are refused at load, naming the field (issue 21),
and a run shortened on the command line below its config's warmup warms up over all its steps."""

from __future__ import annotations

import argparse
import dataclasses
import typing

import pytest
import yaml

from glassbox.cli import main
from glassbox.config import ConfigError
from glassbox.data.config import BlendSource, DataConfig
from glassbox.models.transformer import ModelConfig
from glassbox.train.cli import add_train_args, config_from_args, overrides_from_args
from glassbox.train.config import BatchConfig, BatchStage, LoggingConfig, OptimizerConfig, RunConfig
from train_testlib import tiny_config, tiny_dict


def _float_fields(cls, prefix: str = "") -> list[str]:
    """Dotted names of every float field of `cls` and the config sections under it (lists of floats: item 0)."""
    names = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if tp is float:
            names.append(prefix + f.name)
        elif tp == list[float]:
            names.append(f"{prefix}{f.name}[0]")
        elif dataclasses.is_dataclass(tp):
            names += _float_fields(tp, f"{prefix}{f.name}.")
    return names


FLOAT_FIELDS = _float_fields(RunConfig)


def _override(name: str, value: str) -> list[str]:
    if name == "optimizer.betas[0]":
        return [f"optimizer.betas=[{value}, 0.95]"]
    return [f"{name}={value}"]


def test_every_float_field_is_found():
    assert {"optimizer.lr", "optimizer.grad_clip", "optimizer.betas[0]", "model.init_std", "model.norm_eps",
            "model.rope_theta", "logging.peak_flops"} <= set(FLOAT_FIELDS)


@pytest.mark.parametrize("value", ["nan", ".nan", "inf", "-.inf"])
@pytest.mark.parametrize("name", FLOAT_FIELDS)
def test_non_finite_floats_are_refused_naming_the_field(tmp_path, name, value):
    with pytest.raises(ConfigError) as e:
        tiny_config(tmp_path, tmp_path / "run", *_override(name, value))
    assert str(e.value).startswith(f"{name}: expected a finite float, got ")


@pytest.mark.parametrize("overrides,name", [
    (["batch.schedule=[{from_step: 2, size: 8, lr_factor: .nan}]"], "batch.schedule[0].lr_factor"),
    (["data.path=''", "data.blend=[{path: a, weight: .inf}]"], "data.blend[0].weight"),
])
def test_non_finite_floats_in_lists_of_sections_are_refused(tmp_path, overrides, name):
    with pytest.raises(ConfigError) as e:
        tiny_config(tmp_path, tmp_path / "run", *overrides)
    assert str(e.value).startswith(f"{name}: expected a finite float, got ")


@pytest.mark.parametrize("override,message", [
    ("optimizer.grad_clip=-1", "optimizer.grad_clip: must be >= 0, got -1.0"),
    ("optimizer.eps=0", "optimizer.eps: must be positive, got 0.0"),
    ("model.init_std=-1", "model.init_std: must be positive, got -1.0"),
    ("model.init_std=0", "model.init_std: must be positive, got 0.0"),
    ("model.norm_eps=-1", "model.norm_eps: must be positive, got -1.0"),
    ("model.norm_eps=0", "model.norm_eps: must be positive, got 0.0"),
    ("model.rope_theta=0", "model.rope_theta: must be positive, got 0.0"),
    ("model.router_aux_loss_coef=-0.5", "model.router_aux_loss_coef: must be >= 0, got -0.5"),
    ("batch.micro_batch_size=3", "batch.micro_batch_size (3) must divide batch.global_batch_size (8)"),
    ("batch.micro_batch_size=16", "batch.micro_batch_size (16) must divide batch.global_batch_size (8)"),
    ("batch.schedule=[{from_step: 3, size: 6}]",
     "batch.schedule[0].size (6) must be a multiple of batch.micro_batch_size (4)"),
    ("batch.schedule=[{from_step: 3, size: 8}, {from_step: 5, size: 2}]",
     "batch.schedule[1].size (2) must be a multiple of batch.micro_batch_size (4)"),
    ("logging.val_samples=100000", "logging.val_samples: must be <= 65536, got 100000"),
])
def test_values_that_would_break_training_name_the_field(tmp_path, override, message):
    with pytest.raises(ConfigError) as e:
        tiny_config(tmp_path, tmp_path / "run", override)
    assert str(e.value).startswith(message)


def test_micro_batches_that_divide_every_stage_are_accepted(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path / "run", "batch.micro_batch_size=2",
                      "batch.schedule=[{from_step: 3, size: 12}, {from_step: 5, size: 2}]")
    assert [s.size for s in cfg.batch.schedule] == [12, 2]
    assert tiny_config(tmp_path, tmp_path / "run", "logging.val_samples=65536").logging.val_samples == 65536


@pytest.mark.parametrize("section,name", [
    (OptimizerConfig(lr=float("nan")), "optimizer.lr"),
    (OptimizerConfig(grad_clip=float("nan")), "optimizer.grad_clip"),
    (OptimizerConfig(weight_decay=float("nan")), "optimizer.weight_decay"),
    (OptimizerConfig(eps=float("nan")), "optimizer.eps"),
    (ModelConfig(init_std=float("nan")), "model.init_std"),
    (ModelConfig(norm_eps=float("nan")), "model.norm_eps"),
    (ModelConfig(rope_theta=float("nan")), "model.rope_theta"),
    (ModelConfig(router_aux_loss_coef=float("nan")), "model.router_aux_loss_coef"),
    (LoggingConfig(peak_flops=float("nan")), "logging.peak_flops"),
    (DataConfig(blend=[BlendSource("a", float("nan"))]), "data.blend[0].weight"),
])
def test_validate_names_a_nan_built_in_code(section, name):
    """A section built in code (no loader) still names its own NaN field, not a neighbour's."""
    with pytest.raises(ConfigError) as e:
        section.validate()
    assert str(e.value).startswith(f"{name}: ")


def test_a_nan_lr_is_an_lr_error_not_a_min_lr_error():
    with pytest.raises(ConfigError) as e:
        OptimizerConfig(lr=float("nan")).validate()
    assert "min_lr" not in str(e.value)


def test_nan_lr_factor_built_in_code():
    with pytest.raises(ConfigError, match=r"^batch.schedule\[0\].lr_factor: must be positive, got nan"):
        BatchConfig(global_batch_size=8, micro_batch_size=4, schedule=[BatchStage(2, 8, float("nan"))]).validate()


def test_cli_reports_a_bad_model_value_in_one_line(prepared_data, tmp_path, capsys):
    """On real data: before the check, init_std=-1 got as far as the model's init and a raw traceback."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_dict(prepared_data, tmp_path / "run")))
    assert main(["train", "--config", str(path), "--set", "model.init_std=-1"]) == 2
    assert capsys.readouterr().err.strip() == "glassbox: error: model.init_std: must be positive, got -1.0"


# --steps below the config's warmup


def _long_warmup_config(tmp_path, data_dir):
    cfg = tiny_dict(data_dir, tmp_path / "unused")
    cfg["schedule"] = {"steps": 500, "warmup_steps": 100}
    path = tmp_path / "long-warmup.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _args(*argv: str):
    p = argparse.ArgumentParser()
    add_train_args(p)
    p.add_argument("--nproc", type=int, default=1)
    return p.parse_args(list(argv))


def test_steps_below_the_warmup_clamp_it_with_one_warning(prepared_data, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "--config", str(_long_warmup_config(tmp_path, prepared_data)), "--data",
                 str(prepared_data), "--run-dir", str(run), "--steps", "3"])
    assert code == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("glassbox: warning:")]
    assert warnings == ["glassbox: warning: schedule.steps (3) from the command line is below schedule.warmup_steps "
                        "(100): warming up over all 3 steps (schedule.warmup_steps=3)"]
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["schedule"]["steps"] == 3 and resolved["schedule"]["warmup_steps"] == 3


def test_set_schedule_steps_clamps_too_and_torchrun_ranks_get_the_clamped_value(tmp_path, capsys):
    from glassbox.train.cli import resolved_overrides, torchrun_command

    args = _args("--config", str(_long_warmup_config(tmp_path, tmp_path / "data")), "--set", "schedule.steps=10",
                 "--nproc", "2")
    overrides = resolved_overrides(args)
    assert overrides == overrides_from_args(args) + ["schedule.warmup_steps=10"]
    assert capsys.readouterr().err.count("glassbox: warning:") == 1
    cmd = torchrun_command(args, overrides)
    assert cmd[-2:] == ["--set", "schedule.warmup_steps=10"]
    # Each rank re-reads the config with the clamp given: no second warning from the ranks.
    ranks = _args(*cmd[cmd.index("glassbox.train") + 1:])
    assert resolved_overrides(ranks) == overrides
    assert capsys.readouterr().err == ""


def test_a_warmup_set_on_the_command_line_is_not_clamped(tmp_path):
    config = str(_long_warmup_config(tmp_path, tmp_path / "data"))
    with pytest.raises(ConfigError, match=r"schedule.warmup_steps \(100\) exceeds schedule.steps \(10\)"):
        config_from_args(_args("--config", config, "--steps", "10", "--set", "schedule.warmup_steps=100"))


def test_a_config_file_whose_warmup_exceeds_its_steps_is_still_refused(tmp_path):
    path = _long_warmup_config(tmp_path, tmp_path / "data")
    data = yaml.safe_load(path.read_text())
    data["schedule"]["steps"] = 50
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"schedule.warmup_steps \(100\) exceeds schedule.steps \(50\)"):
        config_from_args(_args("--config", str(path)))
