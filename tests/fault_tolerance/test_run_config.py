"""The `fault_tolerance:` section and the train command's recovery flags: what they set, and what they refuse."""

from __future__ import annotations

import argparse

import pytest

from glassbox.config import ConfigError, from_dict
from glassbox.fault_tolerance.config import FailureInjection, FaultToleranceConfig
from glassbox.train.cli import add_train_args, overrides_from_args, torchrun_command, torchrun_env
from glassbox.train.config import RunConfig


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_train_args(p)
    p.add_argument("--nproc", type=int, default=1)
    return p.parse_args(list(argv))


def test_injection_specs_parse_and_bad_ones_name_the_field():
    assert FailureInjection.parse("rank=1,step=40") == FailureInjection(1, 40)
    assert FailureInjection.parse("step=7, rank=0, mid_save") == FailureInjection(0, 7, mid_save=True)
    assert str(FailureInjection.parse("rank=2,step=9,in_process")) == "rank=2,step=9,in_process"
    for bad, why in [("rank=1", "expected"), ("rank=1,step=x", "step must be an integer"),
                     ("rank=1,step=0", "step >= 1"), ("rank=1,step=3,mid_save,in_process", "exclude"),
                     ("rank=1,rank=2,step=3", "expected"), ("node=1,step=3", "expected")]:
        with pytest.raises(ConfigError, match=f"fault_tolerance.inject: .*{why}"):
            FailureInjection.parse(bad)


def test_section_checks_its_fields_and_the_partial_interval_is_r_times_c():
    assert FaultToleranceConfig(recovery="partial", interval=100, fraction=0.25).partial_every == 25
    assert FaultToleranceConfig(recovery="partial", interval=4, fraction=0.1).partial_every == 1
    assert FaultToleranceConfig(recovery="full", interval=100).partial_every == 0     # only partial writes them
    for section, field in [({"fraction": 0}, "fraction"), ({"interval": -1}, "interval"),
                           ({"recovery": "off"}, "recovery"), ({"inject": "rank=1,step=2"}, "inject"),
                           ({"local_dir": ""}, "local_dir")]:
        with pytest.raises(ConfigError, match=f"fault_tolerance.{field}"):
            from_dict(FaultToleranceConfig, section, "fault_tolerance")
    with pytest.raises(ConfigError, match="needs checkpoint.resume"):
        from_dict(RunConfig, {"fault_tolerance": {"recovery": "partial"}})


def test_recovery_flags_set_the_section_resume_auto_and_torchrun_restarts():
    args = _args("--config", "tiny", "--recovery", "partial", "--inject-failure", "rank=1,step=40", "--nproc", "2")
    overrides = overrides_from_args(args)
    assert {'checkpoint.resume="auto"', 'fault_tolerance.recovery="partial"',
            'fault_tolerance.inject="rank=1,step=40"'} <= set(overrides)
    explicit = overrides_from_args(_args("--config", "tiny", "--recovery", "full", "--resume", "runs/x"))
    assert 'checkpoint.resume="runs/x"' in explicit
    assert not any(o.startswith("checkpoint.resume") for o in overrides_from_args(_args("--config", "tiny")))
    assert "--max-restarts=3" in torchrun_command(args, overrides, 3)
    assert torchrun_env(3)["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert "--max-restarts=0" in torchrun_command(args, overrides)
