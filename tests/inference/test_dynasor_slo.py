"""The online figures on synthetic sweeps, hand-checked: attainment within an SLO, and the sustained rate read
where attainment crosses the target (interpolated, every lower rate held)."""

from __future__ import annotations

import pytest

from glassbox.inference.dynasor.slo import attainment, rate_ratio, sustained_rate


def test_attainment_counts_latencies_within_the_slo():
    assert attainment([0.5, 1.0, 1.5, 3.0], 1.5) == 0.75        # the SLO itself is within
    assert attainment([], 1.0) == 0.0


def test_sustained_rate_interpolates_the_crossing():
    # Held at 2 (95%), missed at 4 (50%): 0.9 is crossed 0.05 / 0.45 of the way from 2 to 4.
    points = [(1.0, 1.0), (2.0, 0.95), (4.0, 0.5), (8.0, 0.1)]
    assert sustained_rate(points, 0.9) == pytest.approx(2 + 2 * 0.05 / 0.45)       # 2.222
    assert sustained_rate(points[::-1], 0.9) == pytest.approx(2.2222, abs=1e-4)    # order of the rows is no matter
    # Exactly on the target is held: the crossing lies past it.
    assert sustained_rate([(1.0, 0.9), (3.0, 0.7)], 0.9) == 1.0


def test_a_rate_held_above_a_missed_one_does_not_count():
    # 4 holds again (92%) but 2 did not (85%): the crossing is between 1 and 2, at half way.
    assert sustained_rate([(1.0, 0.95), (2.0, 0.85), (4.0, 0.92)], 0.9) == pytest.approx(1.5)


def test_sustained_rate_at_the_sweeps_ends():
    assert sustained_rate([(0.5, 0.81), (1.0, 0.80)], 0.9) == 0.0      # the lowest rate missed (the H200 run)
    assert sustained_rate([(0.5, 1.0), (1.0, 0.97)], 0.9) == 1.0       # every rate held: a lower bound
    assert sustained_rate([], 0.9) == 0.0


def test_rate_ratio():
    assert rate_ratio(3.3, 1.1) == pytest.approx(3.0)
    assert rate_ratio(2.0, 0.0) is None and rate_ratio(0.0, 0.0) == 1.0
