"""`glassbox ltr collect|train|eval`: label prompts with the served model's output lengths, train the ranker, and
measure it (Kendall's tau on held-out prompts beside two baselines)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ltr", help="learning-to-rank scheduling: collect output lengths, train and evaluate a ranker")
    ltr = p.add_subparsers(dest="ltr_command", metavar="STEP", required=True)

    c = ltr.add_parser("collect", help="generate over the prompt mix and record each output's length")
    c.add_argument("--model", required=True, help="the served model's HF directory (with tokenizer.json)")
    c.add_argument("--out", required=True, help="the collection directory to write")
    c.add_argument("--num-prompts", type=int, default=300, help="prompts in the mix (default: 300)")
    c.add_argument("--prompts", default=None,
                   help="a prompt file (.jsonl[.gz] of source, text) instead of generating the mix here")
    c.add_argument("--max-tokens", type=int, default=256, help="output cap; longer ones are labelled so (default: 256)")
    c.add_argument("--max-num-seqs", type=int, default=64, help="engine batch (default: 64)")
    c.add_argument("--device", default="cpu")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(handler=_collect)

    t = ltr.add_parser("train", help="train the ranker's head with ListMLE (a run directory)")
    t.add_argument("--data", required=True, help="a collection directory (`glassbox ltr collect`)")
    t.add_argument("--model", required=True, help="the model the collection came from: its first layers are the trunk")
    t.add_argument("--run-dir", required=True, help="where the run is recorded; the ranker lands in RUN_DIR/ranker")
    t.add_argument("--layers", default="2,4,8",
                   help="trunk depths to try; the best on validation wins (default: 2,4,8)")
    t.add_argument("--epochs", type=int, default=40)
    t.add_argument("--list-size", type=int, default=32, help="prompts per ranked list (default: 32)")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--device", default="cpu")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(handler=_train)

    e = ltr.add_parser("eval", help="Kendall's tau on the held-out split, beside the prompt-length and classifier "
                                    "baselines")
    e.add_argument("--ranker", required=True, help="a ranker directory (RUN_DIR/ranker)")
    e.add_argument("--data", required=True, help="the collection it was trained on")
    e.add_argument("--out", default=None, help="also write the figures to this JSON file")
    e.add_argument("--device", default="cpu")
    e.set_defaults(handler=_eval)


def _collect(args: argparse.Namespace) -> int:
    from glassbox.inference.ltr.collect import collect
    from glassbox.inference.ltr.prompts import load_prompts

    prompts = load_prompts(Path(args.prompts)) if args.prompts else None
    meta = collect(Path(args.model), Path(args.out), args.num_prompts, args.max_tokens, args.seed, args.device,
                   args.max_num_seqs, prompts=prompts)
    print(json.dumps(meta, indent=2))
    return 0


def _train(args: argparse.Namespace) -> int:
    from glassbox.errors import GlassboxError
    from glassbox.inference.ltr.train import TrainConfig, train

    try:
        layers = [int(k) for k in args.layers.split(",")]
    except ValueError:
        raise GlassboxError(f"ltr train: --layers must be comma-separated integers, got {args.layers!r}") from None
    cfg = TrainConfig(collection=args.data, model_dir=args.model, run_dir=args.run_dir, layers=layers,
                      epochs=args.epochs, list_size=args.list_size, lr=args.lr, device=args.device, seed=args.seed)
    print(json.dumps(train(cfg), indent=2))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from glassbox.atomic import write_json
    from glassbox.inference.ltr.evaluate import evaluate

    result = evaluate(Path(args.ranker), Path(args.data), args.device)
    if args.out:
        write_json(args.out, result)
    print(json.dumps(result, indent=2))
    return 0
