"""`glassbox release verify`: a clean release passes; a tampered file or changed logits fail, named."""

from __future__ import annotations

import json

from glassbox.atomic import sha256_file
from glassbox.cli import main

from release_helpers import copy_tree


def test_clean_release_verifies(built_release, capsys):
    assert main(["release", "verify", str(built_release)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("release OK") and "4 branches loaded in transformers" in out


def test_tampered_weight_file_is_named(built_release, tmp_path, capsys):
    rel = copy_tree(built_release, tmp_path / "rel")
    target = rel / "branches" / "step00000002" / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[-3] ^= 0x01                        # one bit of the last weight: the file still loads
    target.write_bytes(bytes(data))
    assert main(["release", "verify", str(rel)]) == 1
    out = capsys.readouterr().out
    assert "hash mismatch: branches/step00000002/model.safetensors" in out
    assert "release FAILED" in out


def test_changed_logits_are_caught_even_with_a_consistent_manifest(built_release, tmp_path, capsys):
    rel = copy_tree(built_release, tmp_path / "rel")
    index = json.loads((rel / "release.json").read_text())
    index["branches"][0]["probe"]["logsumexp"][3] += 0.01
    (rel / "release.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    manifest = json.loads((rel / "manifest.json").read_text())
    entry = manifest["files"]["release.json"]
    entry["sha256"], entry["size"] = sha256_file(rel / "release.json"), (rel / "release.json").stat().st_size
    (rel / "manifest.json").write_text(json.dumps(manifest))
    assert main(["release", "verify", str(rel)]) == 1
    out = capsys.readouterr().out
    assert "branch step00000001: probe logits differ from the recorded values by 0.01" in out
    assert "hash mismatch" not in out


def test_unloadable_branch_and_missing_file_are_reported(built_release, tmp_path, capsys):
    rel = copy_tree(built_release, tmp_path / "rel")
    (rel / "branches" / "step00000004" / "config.json").unlink()
    assert main(["release", "verify", str(rel)]) == 1
    out = capsys.readouterr().out
    assert "missing file: branches/step00000004/config.json" in out
    assert "branch step00000004 does not load" in out


def test_not_a_release_is_a_clear_error(tmp_path, capsys):
    assert main(["release", "verify", str(tmp_path)]) == 2
    assert "is not a glassbox release: release.json is missing" in capsys.readouterr().err
