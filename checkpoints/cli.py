"""`glassbox export` (checkpoint -> Hugging Face directory) and `glassbox checkpoint verify|list`."""

from __future__ import annotations

import argparse
from pathlib import Path

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint to Hugging Face format (safetensors + config.json)")
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint directory (RUN_DIR/checkpoints/step_NNNNNN), or a run directory for its latest")
    p.add_argument("--out", required=True, help="the Hugging Face model directory to write")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast the weights (default: as trained)")
    p.set_defaults(handler=run_export)

    c = sub.add_parser("checkpoint", help="inspect checkpoints: verify hashes, list a run's checkpoints")
    csub = c.add_subparsers(dest="checkpoint_command", metavar="ACTION", required=True)
    v = csub.add_parser("verify", help="check every file of a checkpoint against its MANIFEST.json")
    v.add_argument("path", help="a checkpoint directory, or a run directory for its latest")
    v.set_defaults(handler=run_verify)
    ls = csub.add_parser("list", help="list a run's committed checkpoints and whether each verifies")
    ls.add_argument("run_dir")
    ls.set_defaults(handler=run_list)


def run_export(args: argparse.Namespace) -> int:
    import torch

    from glassbox.checkpoints.export import export_checkpoint

    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    out = export_checkpoint(Path(args.checkpoint), Path(args.out), dtype=dtype)
    print(f"exported {args.checkpoint} -> {out}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from glassbox.checkpoints.loading import resolve_checkpoint_path
    from glassbox.checkpoints.manifest import verify

    path = resolve_checkpoint_path(Path(args.path))
    manifest = verify(path)
    print(f"{path}: OK ({len(manifest['files'])} files, step {manifest['step']}, samples {manifest['samples']})")
    return 0


def run_list(args: argparse.Namespace) -> int:
    from glassbox.checkpoints.layout import checkpoints_root, list_checkpoints
    from glassbox.checkpoints.manifest import CheckpointCorrupt, verify

    root = checkpoints_root(Path(args.run_dir))
    found = list_checkpoints(root)
    if not found:
        print(f"no checkpoints in {root}")
    for step, path in found:
        try:
            manifest = verify(path)
            status = f"ok  samples={manifest['samples']} tokens={manifest['tokens']}"
        except CheckpointCorrupt as e:
            status = f"BAD {e}"
        print(f"{path.name}  {status}")
    return 0
