"""Security rules over the package's own source: nothing it reads from a file can run code."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AREAS = ["glassbox", "data", "models", "train", "checkpoints", "inference", "release", "elastic", "fault_tolerance"]


def _calls():
    for area in AREAS:
        for path in sorted((ROOT / area).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Call):
                    yield path.relative_to(ROOT), node


def _name(func: ast.AST) -> str:
    if isinstance(func, ast.Attribute):
        return f"{_name(func.value)}.{func.attr}"
    return func.id if isinstance(func, ast.Name) else ""


def test_every_torch_load_is_weights_only_and_nothing_unpickles_or_trusts_remote_code():
    problems = []
    for path, call in _calls():
        name = _name(call.func)
        keywords = {k.arg: k.value for k in call.keywords}
        where = f"{path}:{call.lineno}"
        if name == "torch.load":
            flag = keywords.get("weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                problems.append(f"{where}: torch.load without weights_only=True")
        if name in ("pickle.load", "pickle.loads", "yaml.load", "yaml.unsafe_load", "yaml.full_load"):
            problems.append(f"{where}: {name}")
        remote = keywords.get("trust_remote_code")
        if remote is not None and not (isinstance(remote, ast.Constant) and remote.value is False):
            problems.append(f"{where}: trust_remote_code")
    assert not problems, "\n".join(problems)


def test_the_rule_checker_sees_a_violation(tmp_path):
    tree = ast.parse("import torch\ntorch.load('x')\nAutoModel.from_pretrained('m', trust_remote_code=True)\n")
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    assert {_name(c.func) for c in calls} >= {"torch.load", "AutoModel.from_pretrained"}


def test_no_token_reaches_a_run_directory_or_a_release(prepared_data, tmp_path, monkeypatch):
    """Tokens in the environment (the Hub's, wandb's) never land in a file a run or a release writes."""
    import shutil

    import yaml

    from glassbox.cli import main

    secret = "hf_SENTINELtoken0123456789abcdef"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("WANDB_API_KEY", secret)
    shutil.copytree(prepared_data, tmp_path / "store", ignore=shutil.ignore_patterns("cache"))
    cfg = {
        "model": {"vocab_size": 512, "hidden_size": 32, "num_layers": 1, "num_heads": 4, "num_kv_heads": 2,
                  "intermediate_size": 64, "max_seq_len": 32},
        "data": {"path": str(tmp_path / "store"), "seq_len": 32, "seed": 7},
        "schedule": {"steps": 2, "warmup_steps": 1},
        "batch": {"global_batch_size": 4, "micro_batch_size": 4},
        "logging": {"val_every": 0, "val_samples": 4, "progress": False, "wandb": {"mode": "offline"}},
        "parallel": {"device": "cpu"},
        "checkpoint": {"every": 1},
        "run_dir": str(tmp_path / "run"),
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(tmp_path / "run.yaml")]) == 0
    assert main(["release", "build", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "release"),
                 "--val-samples", "2"]) == 0
    leaks = [str(p) for root in ("run", "release") for p in (tmp_path / root).rglob("*")
             if p.is_file() and secret.encode() in p.read_bytes()]
    assert not leaks, leaks
