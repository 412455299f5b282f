"""The offline simulator on a trace small enough to check by hand, its trace reader, and its command."""

from __future__ import annotations

import gzip
import json

import pytest

from glassbox.cli import main
from glassbox.errors import GlassboxError
from glassbox.inference.speculative.draft import Draft
from glassbox.inference.speculative.simulator import (GlassboxSpeculator, Request, accepted_length, load_traces,
                                                      simulate)
from glassbox.inference.speculative.suffix import SuffixConfig

# Request 0 (nothing cached): step 1 has no match and emits 1; step 2 matches "1" (p=1, budget 1), drafts [2],
# accepts it and emits 2 3; step 3 matches "1 2 3" and drafts [1 2 3], rejected, emits 4. Request 1 drafts from
# the cached output: step 1 nothing (emits 1), step 2 [2] accepted (emits 2 3), step 3 [4] accepted (emits 4).
TRACE = [Request([1, 2, 3], [1, 2, 3, 4]), Request([9], [1, 2, 3, 4])]
CONFIG = SuffixConfig(max_depth=8, max_spec_tokens=4, max_spec_factor=1.0, min_token_prob=0.1, mode="path")


def test_hand_checked_trace():
    r = simulate(GlassboxSpeculator(CONFIG), TRACE)
    assert r["steps"] == 6 and r["tokens_per_step"] == pytest.approx(8 / 6)
    assert r["drafted_per_step"] == pytest.approx(6 / 6) and r["acceptance_rate"] == pytest.approx(3 / 6)
    assert r["draft_us_median"] > 0 and r["draft_us_p99"] >= r["draft_us_median"]


def test_warm_requests_fill_the_cache_without_being_measured():
    r = simulate(GlassboxSpeculator(CONFIG), TRACE, warm=1)
    assert r["requests"] == 1 and r["steps"] == 3
    assert r["tokens_per_step"] == pytest.approx(4 / 3) and r["acceptance_rate"] == pytest.approx(1.0)


def test_accepted_length_follows_the_matching_branch():
    tree = Draft((5, 6, 7, 8), (-1, -1, 1, 2))  # root children 5 and 6; 6 -> 7 -> 8
    assert accepted_length(tree, [6, 7, 9]) == 2
    assert accepted_length(tree, [5, 7]) == 1
    assert accepted_length(tree, [4]) == 0
    assert accepted_length(Draft.linear([1, 2]), [1, 2, 3]) == 2


def test_trace_reader_names_the_bad_line(tmp_path):
    good = tmp_path / "t.jsonl.gz"
    with gzip.open(good, "wt") as f:
        f.write(json.dumps({"prompt": [1], "response": [2, 3]}) + "\n\n")
    assert load_traces(good) == [Request([1], [2, 3])]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": [1], "response": [2]}) + "\n" + json.dumps({"prompt": "x", "response": []}))
    with pytest.raises(GlassboxError, match=r"bad.jsonl:2: prompt must be a list of token ids"):
        load_traces(bad)
    with pytest.raises(GlassboxError, match="does not exist"):
        load_traces(tmp_path / "missing.jsonl")


def test_simulate_command_writes_the_result(tmp_path, capsys):
    traces = tmp_path / "t.jsonl"
    traces.write_text("".join(json.dumps({"prompt": r.prompt, "response": r.response}) + "\n" for r in TRACE))
    out = tmp_path / "r.json"
    assert main(["speculate", "simulate", str(traces), "--mode", "path", "--max-depth", "8", "--max-spec-tokens",
                 "4", "--max-spec-factor", "1", "--min-token-prob", "0.1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["tokens_per_step"] == pytest.approx(8 / 6) and result["acceptance_rate"] == pytest.approx(0.5)
    assert result["config"]["max_depth"] == 8 and "draft_us_median" in result
    assert main(["speculate", "simulate", str(traces), "--max-depth", "-3", "--out", str(out)]) == 2
    assert "max_depth must be >= 1" in capsys.readouterr().err
    assert main(["speculate", "simulate", str(traces), "--warm", "5", "--out", str(out)]) == 2
