"""The scheduler's batch goodput table is the agent's GoodputModel.best, pair by pair (an adapter, not a model)."""

from __future__ import annotations

import pytest

from glassbox.elastic.goodput import GoodputModel
from glassbox.elastic.sched.speedup import JobShape, goodput_table
from glassbox.elastic.throughput import ThroughputParams


@pytest.mark.parametrize("grad_var", [0.0, 2.0, 50.0])
def test_table_equals_goodput_model_best(grad_var):
    params = ThroughputParams(alpha_c=0.02, beta_c=0.001, alpha_r=0.01, beta_r=0.001, alpha_n=0.05, beta_n=0.002,
                              gamma=2.0)
    shape = JobShape(init_batch=128, max_batch=4096, min_micro=32, max_micro=1024)
    table = goodput_table(params, 1.0, grad_var, shape, max_replicas=24, max_nodes=6)
    model = GoodputModel(params, 1.0, grad_var, 128)
    for n, r in [(1, 1), (1, 2), (1, 4), (2, 2), (2, 8), (3, 5), (6, 24), (4, 17)]:
        assert table[n, r] == pytest.approx(model.best(n, r, 4096, (32, 1024)).goodput, rel=1e-12)
    assert table[0].sum() == 0 and table[:, 0].sum() == 0 and table[3, 2] == 0     # not allocations
