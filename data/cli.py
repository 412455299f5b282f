"""`glassbox data prepare` and `glassbox data batch`."""

from __future__ import annotations

import argparse
from pathlib import Path

from glassbox.errors import GlassboxError


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="prepare token stores; inspect the batches a run trained on")
    data.set_defaults(handler=lambda args: data.print_help() or 0)
    cmds = data.add_subparsers(dest="data_command", metavar="COMMAND")

    p = cmds.add_parser(
        "prepare",
        help="corpora -> tokenizer + token store (megatron .bin/.idx) + meta.json",
        description="Tokenize corpora into a token store. A second run with unchanged inputs is a no-op.",
    )
    p.add_argument(
        "--source",
        action="append",
        required=True,
        metavar="SRC",
        help="stdlib | PATH or GLOB of .txt/.jsonl/.parquet | hf:NAME[:SPLIT]; repeat for several",
    )
    p.add_argument("--out", required=True, type=Path, metavar="DATA_DIR", help="folder to build (replaced whole)")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary to train (default 4096)")
    p.add_argument("--tokenizer", type=Path, metavar="FILE", help="reuse this tokenizer.json instead of training one")
    p.add_argument(
        "--valid-fraction", type=float, default=None, metavar="F", help="share of documents held out (default 0.02)"
    )
    p.add_argument("--max-bytes", type=int, default=None, metavar="N", help="read about N bytes per source at most")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_prepare)

    b = cmds.add_parser(
        "batch",
        help="rebuild a step's batch from a run's data-order log and check it against the logged hash",
    )
    b.add_argument(
        "--run", required=True, type=Path, metavar="RUN_DIR", help="a run directory (config.yaml, data_order.zarr)"
    )
    b.add_argument("--step", required=True, type=int, metavar="N", help="1-based training step")
    b.add_argument("--decode", action="store_true", help="print text instead of token ids")
    b.set_defaults(handler=_batch)


def _prepare(args: argparse.Namespace) -> int:
    from glassbox.data.prepare import DEFAULT_VALID_FRACTION, prepare, prepare_cli_summary

    result = prepare(
        args.source,
        args.out,
        vocab_size=args.vocab_size,
        tokenizer=args.tokenizer,
        valid_fraction=DEFAULT_VALID_FRACTION if args.valid_fraction is None else args.valid_fraction,
        max_bytes=args.max_bytes,
        progress=not args.quiet,
    )
    print(prepare_cli_summary(result))
    return 0


def run_data_config(run_dir: Path):
    """The DataConfig a run trained with, from RUN_DIR/config.yaml's `data:` section."""
    from glassbox.config import from_dict, load_yaml
    from glassbox.data.config import DataConfig

    config = load_yaml(run_dir / "config.yaml")
    if not isinstance(config.get("data"), dict):
        raise GlassboxError(f"{run_dir / 'config.yaml'}: no `data:` section")
    return from_dict(DataConfig, config["data"], "data")


def _batch(args: argparse.Namespace) -> int:
    from glassbox.data.order_log import DataOrderLog, check_logged_batch
    from glassbox.data.sampler import build_sampler

    if not args.run.is_dir():
        raise GlassboxError(f"--run {args.run}: no such run directory")
    cfg = run_data_config(args.run)
    row = DataOrderLog(args.run, read_only=True).row(args.step)
    start, size = row["cursor_start"], row["batch_size"]
    sampler = build_sampler(cfg)
    try:
        tokens = sampler.samples(start, size)
    except GlassboxError as e:
        raise GlassboxError(f"step {args.step}: {e}") from None
    digest = check_logged_batch(tokens, row, cfg.path or "the blend")
    print(
        f"step {args.step}: global samples [{start}, {start + size}) of seq_len {sampler.seq_len} + 1, "
        f"data fingerprint {sampler.fingerprint[:16]}, hash {digest[:16]} matches the log"
    )
    tok = sampler.stores[0].tokenizer() if args.decode else None
    for i, sample in enumerate(tokens.tolist()):
        print(f"--- sample {start + i}")
        print(tok.decode(sample, skip_special_tokens=False) if tok else " ".join(map(str, sample)))
    return 0
