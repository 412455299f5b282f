"""Plots for the model card, drawn so that the same numbers give the same PNG bytes.

matplotlib's Agg backend is deterministic for fixed inputs and style; the only variable part of its PNGs is the
`Software` text chunk (the matplotlib version), which is dropped. The default style is forced so a user's
matplotlibrc cannot change a release's bytes.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

from glassbox.atomic import write_bytes


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    write_bytes(path, buf.getvalue())


def line_plot(path: Path, title: str, xlabel: str, ylabel: str,
              series: Sequence[tuple[str, Sequence[float], Sequence[float]]], logy: bool = False) -> None:
    """One axes, one line per (label, xs, ys); markers when a series has few points (checkpoints)."""
    plt = _figure()
    with plt.style.context("default"):
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        try:
            for label, xs, ys in series:
                ax.plot(list(xs), list(ys), label=label, marker="o" if len(xs) <= 50 else None, linewidth=1.2)
            ax.set_title(title)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            if logy:
                ax.set_yscale("log")
            ax.grid(True, alpha=0.3)
            if len(series) > 1:
                ax.legend(fontsize="small")
            fig.tight_layout()
            _save(fig, path)
        finally:
            plt.close(fig)
