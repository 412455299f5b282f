"""`glassbox release push`: the plan, and the calls it makes on huggingface_hub's real HfApi, recorded.

There is no network here, so the three HfApi methods a push uses are replaced on the real class by recorders
that bind each call to the real method's signature (a call the real API would reject fails the test) and check
repo ids with huggingface_hub's own validator. Everything else (token resolution, HfApi construction, the plan)
runs for real. The live upload itself is untested here (docs/release.md says so).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
from huggingface_hub import HfApi
from huggingface_hub.utils import validate_repo_id

from glassbox.cli import main
from glassbox.release.manifest import list_files

SECRET = "hf_glassboxTestTokenNeverPrinted0123456789"
PUSH_METHODS = ("create_repo", "create_branch", "upload_folder", "upload_file")


@pytest.fixture
def recorded_calls(monkeypatch):
    calls: list[tuple[str, str | None, dict]] = []
    for name in PUSH_METHODS:
        signature = inspect.signature(getattr(HfApi, name))

        def record(api, *args, _name=name, _sig=signature, **kwargs):
            arguments = _sig.bind(api, *args, **kwargs).arguments
            arguments.pop("self")
            validate_repo_id(arguments["repo_id"])
            calls.append((_name, api.token, arguments))

        monkeypatch.setattr(HfApi, name, record)
    return calls


@pytest.fixture
def no_cached_login(monkeypatch, tmp_path):
    import huggingface_hub.constants as constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


def test_dry_run_prints_the_plan_without_a_token(built_release, no_cached_login, recorded_calls, capsys):
    assert main(["release", "push", "--release", str(built_release), "--repo-id", "glassbox-test/tiny",
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert recorded_calls == []
    assert out.splitlines()[0].startswith("push plan: 2 repos, 3 branches, ")
    assert "create repo   model glassbox-test/tiny" in out
    assert "create repo   dataset glassbox-test/tiny-data" in out
    for branch in ("step00000001", "step00000002", "step00000004"):
        assert f"create branch model glassbox-test/tiny@{branch}" in out
    assert "model.safetensors (" in out and "KB)" in out


def test_push_calls_the_hub_api_in_order_and_never_prints_the_token(built_release, recorded_calls, monkeypatch,
                                                                    capsys):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    assert main(["release", "push", "--release", str(built_release), "--repo-id", "glassbox-test/tiny",
                 "--private"]) == 0
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err
    assert {token for _, token, _ in recorded_calls} == {SECRET}
    kinds = [(name, args["repo_id"], args.get("revision") or args.get("branch")) for name, _, args in recorded_calls]
    assert kinds == [
        ("create_repo", "glassbox-test/tiny", None),
        ("create_repo", "glassbox-test/tiny-data", None),
        ("upload_folder", "glassbox-test/tiny-data", "main"),
        ("create_branch", "glassbox-test/tiny", "step00000001"),
        ("upload_folder", "glassbox-test/tiny", "step00000001"),
        ("create_branch", "glassbox-test/tiny", "step00000002"),
        ("upload_folder", "glassbox-test/tiny", "step00000002"),
        ("create_branch", "glassbox-test/tiny", "step00000004"),
        ("upload_folder", "glassbox-test/tiny", "step00000004"),
        ("upload_folder", "glassbox-test/tiny", "main"),
        ("upload_file", "glassbox-test/tiny", "main"),
        ("upload_file", "glassbox-test/tiny", "main"),
    ]
    for name, _, args in recorded_calls:
        if name == "create_repo":
            assert args["private"] is True and args["exist_ok"] is True
        if name == "create_branch":
            assert args["exist_ok"] is True
        if name == "upload_folder":
            assert args["delete_patterns"] == "*"      # a branch made from main must not keep main's files
    uploads = {(a["repo_id"], a["revision"]): a for n, _, a in recorded_calls if n == "upload_folder"}
    # together the uploads carry every released file
    pushed = set()
    for a in uploads.values():
        pushed |= {str(Path(a["folder_path"]) / rel) for rel in list_files(Path(a["folder_path"]))}
    files = {(a["path_or_fileobj"], a["path_in_repo"]) for n, _, a in recorded_calls if n == "upload_file"}
    assert files == {(str(built_release / "release.json"), "release/release.json"),
                     (str(built_release / "manifest.json"), "release/manifest.json")}
    pushed |= {f for f, _ in files}
    assert pushed == {str(built_release / rel) for rel in list_files(built_release)}
    assert uploads[("glassbox-test/tiny-data", "main")]["repo_type"] == "dataset"
    assert json.loads((built_release / "release.json").read_text())["repo_id"] == "glassbox-test/tiny"


def test_push_without_a_token_is_a_clear_error(built_release, no_cached_login, recorded_calls, capsys):
    assert main(["release", "push", "--release", str(built_release), "--repo-id", "glassbox-test/tiny"]) == 2
    assert "no Hugging Face token: set HF_TOKEN" in capsys.readouterr().err
    assert recorded_calls == []


def test_push_to_another_repo_than_the_cards_name_is_refused(built_release, recorded_calls, capsys):
    assert main(["release", "push", "--release", str(built_release), "--repo-id", "someone/else",
                 "--dry-run"]) == 2
    assert "rebuild with `glassbox release build --repo-id someone/else`" in capsys.readouterr().err
