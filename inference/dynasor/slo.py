"""Online serving figures: how many programs finish within a latency SLO, and the highest arrival rate held.

A rate is held when at least a target share of its programs (90%) finish within the SLO. The sustained rate is
where attainment crosses the target, interpolated between the last rate held and the first one missed, and only
over rates all held below it: a rate held above a missed one is noise of the sweep, not capacity (a server cannot
sustain 4 programs/s if it drowns at 2). Reading off the highest rate held instead rounds down to the sweep's
grid, up to a factor of 2 between its points, which a ratio of two such figures compounds.
"""

from __future__ import annotations

from typing import Sequence


def attainment(latencies: Sequence[float], slo_s: float) -> float:
    """The share of `latencies` within `slo_s` (0 for none)."""
    return sum(x <= slo_s for x in latencies) / len(latencies) if latencies else 0.0


def sustained_rate(points: Sequence[tuple[float, float]], target: float) -> float:
    """The rate at which attainment falls below `target`, from (rate, attainment) `points`: linear between the
    last held point and the first missed one, walking up from the lowest rate; 0 when the lowest rate is missed,
    the highest rate (a lower bound) when every one is held."""
    ordered = sorted(points)
    if not ordered or ordered[0][1] < target:
        return 0.0
    for (r0, a0), (r1, a1) in zip(ordered, ordered[1:]):
        if a1 < target:
            return r0 + (a0 - target) / (a0 - a1) * (r1 - r0)
    return ordered[-1][0]


def rate_ratio(dynasor: float, plain: float) -> float | None:
    """Dynasor's sustained rate over plain's; None where plain held none of the rates but Dynasor did (the ratio
    is then unbounded by the sweep), 1 where neither did."""
    if plain:
        return dynasor / plain
    return None if dynasor else 1.0
