"""The MoE configs of the STUN bench load with the shapes their comments promise."""

from __future__ import annotations

import pytest

from glassbox.train.cli import CONFIGS_DIR
from glassbox.train.config import load_run_config


@pytest.mark.parametrize("name, low, high", [("stun-moe", 200e6, 230e6), ("stun-moe-tiny", 3.5e6, 4.2e6)])
def test_stun_configs_are_16_expert_top2_moes_of_their_size(name, low, high):
    m = load_run_config(CONFIGS_DIR / f"{name}.yaml").model
    assert (m.num_experts, m.experts_per_token) == (16, 2)
    assert low <= m.num_params() <= high
    assert m.num_params(active=True) < m.num_params() / 3
