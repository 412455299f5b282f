"""bench/serving_perf.py's ratios section on a real engine and real transformers: the one GPU run the serving issue
asks for takes ratio_b1 / ratio_b32 from it, so a broken section would only show after the device time is spent."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def serving_perf() -> ModuleType:
    """bench/ is scripts, not a package: load serving_perf.py by path (it puts bench/ on sys.path itself for
    inference_throughput, whose measuring function it reuses)."""
    spec = importlib.util.spec_from_file_location("serving_perf", BENCH / "serving_perf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ratios_section_measures_both_sides_and_their_quotient(serving_perf: ModuleType, llama_dir: Path) -> None:
    """Batch 1 and 32 (the summary's keys) at tiny lengths: both sides must produce tokens, and the ratio must be
    engine over transformers, not the other way round or a ratio of wall times that differ in token counts."""
    args = argparse.Namespace(device="cpu", dtype="float32", prompt_len=8, max_tokens=4, ratio_batch_sizes=[1, 32],
                              ratio_repeats=1, ratio_compile=False)
    ratios = serving_perf.bench_ratios(args, llama_dir, vocab=512)
    assert [r["batch"] for r in ratios["rows"]] == [1, 32]
    for row in ratios["rows"]:
        assert row["engine_tok_s"] > 0 and row["transformers_tok_s"] > 0
        assert row["ratio"] == pytest.approx(row["engine_tok_s"] / row["transformers_tok_s"], rel=1e-9)
    summary = serving_perf.ratio_summary(ratios)
    b1, b32 = (round(r["ratio"], 2) for r in ratios["rows"])
    assert summary == {"ratio_b1": b1, "ratio_b32": b32}
    assert serving_perf.ratio_summary(None) == {"ratio_b1": None, "ratio_b32": None}
