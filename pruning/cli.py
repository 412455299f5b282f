"""`glassbox prune stun|unstructured|expert-only|random MODEL_DIR --sparsity S --calib DATA --out DIR`.

The printed summary carries `experts_keep`, the fraction of experts kept; for stun's `--experts-keep auto` it is
the chosen one, with every candidate's held-out loss beside it (`keep_search`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

_METHODS = {"stun": "stun", "unstructured": "unstructured", "expert-only": "expert_only", "random": "random"}
_HELP = {
    "stun": "structured-then-unstructured: drop experts by clustering, then Wanda inside the survivors",
    "unstructured": "baseline: Wanda inside every expert, no expert removed",
    "expert-only": "baseline: expert clustering alone, keeping 1 - S of the experts",
    "random": "baseline: drop a random 1 - S of each layer's experts",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("prune", help="prune an MoE model directory (STUN and baselines)",
                              description="Prune a Hugging Face MoE directory into a new one the engine serves.")
    methods = p.add_subparsers(dest="method", metavar="METHOD", required=True)
    for name, text in _HELP.items():
        m = methods.add_parser(name, help=text, description=text)
        m.add_argument("model_dir", type=Path, help="a Hugging Face MoE model directory (Mixtral or glassbox_moe)")
        m.add_argument("--sparsity", type=float, required=True,
                       help="fraction of the expert weights to remove, in [0, 1)")
        if name == "stun":
            m.add_argument("--experts-keep", default="auto",
                           help="fraction of all experts stage 1 keeps, in (0, 1] and at least 1 - sparsity; or "
                                "'auto': the candidate in [1 - sparsity, 1] (1 = Wanda alone) with the lowest loss "
                                "on a held-out quarter of the calibration windows, among 1 and those that beat it "
                                "by more than 2 paired standard errors (default: auto)")
        if name in ("stun", "expert-only"):
            m.add_argument("--similarity", choices=["coselect-output", "coselect", "router"],
                           default="coselect-output",
                           help="expert distance: top-k co-selection on the calibration pass weighted by the "
                                "experts' output contributions, plain co-selection (the paper's), or router-weight "
                                "distance with no forward pass (default: coselect-output)")
            m.add_argument("--router", choices=["keep", "mean"], default="keep",
                           help="a kept expert's router row: its own, or the mean of its cluster's (default: keep)")
        if name in ("stun", "unstructured"):
            m.add_argument("--owl", action="store_true", help="OWL per-layer sparsity ratios for the Wanda stage")
        m.add_argument("--calib", type=Path, required=name != "random",
                       help="calibration data: a prepared data directory or a .txt / .jsonl file")
        m.add_argument("--calib-samples", type=int, default=128, help="calibration sequences (default: 128)")
        m.add_argument("--calib-seq-len", type=int, default=None,
                       help="tokens per calibration sequence (default: min(256, the model's context))")
        m.add_argument("--out", type=Path, required=True, help="the pruned model directory to write")
        m.add_argument("--seed", type=int, default=0, help="seed for calibration windows and random drop")
        m.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
        m.set_defaults(handler=_prune)


def _prune(args: argparse.Namespace) -> int:
    import torch

    from glassbox.checkpoints.hf_format import load_hf_model_dir
    from glassbox.pruning.auto_keep import candidate_losses
    from glassbox.pruning.calibration import token_windows
    from glassbox.pruning.output import write_pruned_dir
    from glassbox.pruning.prune import PruneOptions, check_options, parse_experts_keep, prune

    torch.manual_seed(args.seed)
    experts_keep = parse_experts_keep(args.experts_keep) if args.method == "stun" else None
    model, cfg = load_hf_model_dir(args.model_dir, dtype=torch.float32, device=args.device)
    opts = PruneOptions(method=_METHODS[args.method], sparsity=args.sparsity,
                        experts_keep=experts_keep,
                        similarity=getattr(args, "similarity", "coselect-output"),
                        router=getattr(args, "router", "keep"),
                        owl=getattr(args, "owl", False), seed=args.seed)
    check_options(model, opts)
    if args.calib is not None:
        seq_len = args.calib_seq_len or min(256, cfg.max_seq_len)
        windows = token_windows(args.calib, args.calib_samples, seq_len, args.seed, cfg.vocab_size, args.model_dir)
    else:
        windows = torch.zeros(0, 1, dtype=torch.long)
    pruned, report = prune(model, windows, opts)
    write_pruned_dir(pruned, args.model_dir, args.out, report.to_dict())
    summary = {k: report.to_dict()[k]
               for k in ("method", "sparsity", "experts_before", "experts_after", "experts_keep")}
    if "keep_search" in report.stage1:                  # auto: each candidate fraction's held-out loss
        summary["keep_search"] = candidate_losses(report.stage1["keep_search"])
    print(json.dumps({"out": str(args.out), **summary}))
    return 0
