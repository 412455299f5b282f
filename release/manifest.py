"""The release manifest: sha256 and size of every file, so anyone can check a download byte for byte.

The manifest lists files by their path relative to the release root (POSIX separators, sorted) and holds no
timestamps, so two builds of the same run give the same manifest. It never lists itself. The tables are
glassbox.file_table's, as a checkpoint's are.
"""

from __future__ import annotations

from pathlib import Path

from glassbox.atomic import write_json
from glassbox.errors import GlassboxError
from glassbox.file_table import TableCheck, check_table, file_table, list_files

MANIFEST_VERSION = 1
SIZE = "size"


def build_manifest(root: Path, manifest_name: str) -> dict:
    return {"version": MANIFEST_VERSION, "files": file_table(root, list_files(root, exclude=(manifest_name,)), SIZE)}


def write_manifest(root: Path, manifest_name: str) -> dict:
    manifest = build_manifest(root, manifest_name)
    write_json(root / manifest_name, manifest)
    return manifest


def check_manifest(root: Path, manifest: dict, manifest_name: str) -> TableCheck:
    """Compare every file under `root` with the manifest; the result names each file that differs."""
    listed = manifest.get("files")
    if not isinstance(listed, dict):
        raise GlassboxError(f"{root / manifest_name}: no 'files' table")
    return check_table(root, listed, present=list_files(root, exclude=(manifest_name,)), size_key=SIZE)
