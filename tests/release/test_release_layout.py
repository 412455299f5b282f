"""Branch naming and the release manifest, on real files."""

from __future__ import annotations

import pytest

from glassbox.errors import GlassboxError
from glassbox.release.layout import branch_name, branch_step
from glassbox.release.manifest import check_manifest, write_manifest


def test_branch_names_sort_by_step_and_round_trip():
    steps = [0, 1, 2, 9, 10, 99, 100, 512, 1000, 143000, 99_999_999]
    names = [branch_name(s) for s in steps]
    assert names == sorted(names)
    assert names[1] == "step00000001"
    assert [branch_step(n) for n in names] == steps
    with pytest.raises(GlassboxError, match="8-digit"):
        branch_name(10**8)
    with pytest.raises(GlassboxError, match="not a release branch name"):
        branch_step("step_000100")


def test_manifest_is_deterministic_and_names_every_kind_of_change(tmp_path):
    for root in (tmp_path / "a", tmp_path / "b"):
        (root / "sub").mkdir(parents=True)
        (root / "sub" / "w.bin").write_bytes(bytes(range(256)) * 10)
        (root / "README.md").write_text("card\n")
    write_manifest(tmp_path / "a", "manifest.json")
    write_manifest(tmp_path / "b", "manifest.json")
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()

    import json

    root = tmp_path / "a"
    manifest = json.loads((root / "manifest.json").read_text())
    assert set(manifest["files"]) == {"README.md", "sub/w.bin"}
    assert check_manifest(root, manifest, "manifest.json").ok

    data = bytearray((root / "sub" / "w.bin").read_bytes())
    data[100] ^= 1                                      # same size, one bit flipped
    (root / "sub" / "w.bin").write_bytes(bytes(data))
    (root / "README.md").unlink()
    (root / "extra.txt").write_text("x")
    check = check_manifest(root, manifest, "manifest.json")
    assert not check.ok
    assert check.problems() == ["hash mismatch: sub/w.bin", "missing file: README.md", "unlisted file: extra.txt"]
