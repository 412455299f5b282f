"""Scheduling policies: which waiting sequences are admitted next, and which running one is preempted first.

A policy is an ordering. The scheduler admits waiting sequences in `order_waiting` order while blocks and the
token budget last, and when blocks run out it preempts running sequences from the end of `order_running`.
Learning-to-rank and program-gang policies plug in here by supplying their own orderings.
"""

from __future__ import annotations

from typing import Protocol

from glassbox.errors import GlassboxError
from glassbox.inference.sequence import Sequence


class SchedulingPolicy(Protocol):
    name: str

    def order_waiting(self, waiting: list[Sequence]) -> list[Sequence]:
        """Waiting sequences, the first to admit first."""
        ...

    def order_running(self, running: list[Sequence]) -> list[Sequence]:
        """Running sequences, most important first; the last is preempted first."""
        ...


class FCFS:
    """First come, first served: earliest arrival first; the latest arrival is preempted first.

    Ties (the n samples of one request arrive together) break by sequence id, so a request's samples stay in order.
    """

    name = "fcfs"

    @staticmethod
    def _key(seq: Sequence) -> tuple[float, int]:
        return (seq.arrival_time, seq.seq_id)

    def order_waiting(self, waiting: list[Sequence]) -> list[Sequence]:
        return sorted(waiting, key=self._key)

    def order_running(self, running: list[Sequence]) -> list[Sequence]:
        return sorted(running, key=self._key)


class Priority(FCFS):
    """Lower `priority` value first, then FCFS."""

    name = "priority"

    @staticmethod
    def _key(seq: Sequence) -> tuple[float, float, int]:
        return (seq.priority, seq.arrival_time, seq.seq_id)


POLICIES: dict[str, type] = {"fcfs": FCFS, "priority": Priority}


def make_policy(name: str) -> SchedulingPolicy:
    if name not in POLICIES:
        raise GlassboxError(f"unknown scheduling policy {name!r} (known: {', '.join(POLICIES)})")
    return POLICIES[name]()
