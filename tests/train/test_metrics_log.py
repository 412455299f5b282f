"""metrics.jsonl reading: one rule for every reader."""

from __future__ import annotations

import pytest

from glassbox.errors import GlassboxError
from glassbox.train.metrics_log import read_metrics


def test_a_torn_last_line_is_skipped_and_any_other_bad_line_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert read_metrics(path) == [{"step": 1}, {"step": 2}]
    assert read_metrics(tmp_path) == [{"step": 1}, {"step": 2}]          # a run directory names its file
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(GlassboxError, match=r"metrics\.jsonl:2: not JSON"):
        read_metrics(path)
    assert read_metrics(tmp_path / "none.jsonl") == []
    with pytest.raises(GlassboxError, match="is missing: not a finished run"):
        read_metrics(tmp_path / "none.jsonl", required=True)
