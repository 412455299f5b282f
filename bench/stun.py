"""STUN vs unstructured-only vs expert-only vs random expert drop on one trained glassbox MoE, at 20-60% sparsity.

For each total sparsity S (of the expert weights, glassbox.pruning.prune) and method, the pruned model's
validation loss and next-token accuracy on the data directory's validation split, and its accuracy on held-out
reasoning-gym arithmetic problems (bench/stun_corpus.py; greedy, scored by reasoning-gym's scorer when it is
installed, else by exact match of the answer, which is what that scorer gives 1.0 for). STUN runs once more per
sparsity with each --compare-similarity distance (default: the paper's plain co-selection, as `stun_coselect`),
so the default distance and the paper's are measured on the same model and windows; with --owl, STUN and Wanda
once more with OWL's per-layer ratios (`stun_owl`, `unstructured_owl`). STUN's fraction of experts kept is chosen
per model and sparsity by `--experts-keep auto` (glassbox.pruning.auto_keep; the default `--stun-expert-share
auto`), or fixed at 1 - share x S with a number. Then the cost of stage 1 (wall time and forward passes, and the
auto search's) for the model and for a 2x-experts copy of it (each expert duplicated with a little noise, router
rows too): the passes do not grow with the expert count. Then serving through the engine, dense vs pruned at one
sparsity: weight memory and decode throughput. Expert pruning removes whole experts, so the weights shrink and
each routed token's work is unchanged; unstructured sparsity stores zeros in dense tensors, so it saves neither
memory nor time with dense kernels, and this bench measures exactly that rather than assuming it.

    python bench/stun.py --model-dir HF_DIR --data DATA_DIR [--device cuda] [--owl] [--out-name NAME]

Writes bench/results/<out-name>.json (summary: val_loss keyed by sparsity "0.2".."0.6" and method, plus dense),
.md and .png; the out name defaults to `stun` on a GPU and `stun_cpu` on the CPU.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stun_corpus import EVAL, TASK, prompt  # noqa: E402

from glassbox.checkpoints.hf_format import load_hf_model_dir  # noqa: E402
from glassbox.models.transformer import Transformer  # noqa: E402
from glassbox.pruning.auto_keep import candidate_losses  # noqa: E402
from glassbox.pruning.calibration import token_windows  # noqa: E402
from glassbox.pruning.expert_drop import drop_experts  # noqa: E402
from glassbox.pruning.output import write_pruned_dir  # noqa: E402
from glassbox.pruning.prune import (  # noqa: E402
    METHODS, SIMILARITIES, ExpertsKeep, PruneOptions, auto_experts_keep, cluster_experts, prune)

RESULTS = Path(__file__).resolve().parent / "results"


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"


@torch.no_grad()
def val_metrics(model: Transformer, windows: torch.Tensor, batch: int) -> tuple[float, float]:
    """Mean next-token loss (nats) and top-1 accuracy over `windows`."""
    device = next(model.parameters()).device
    loss_sum, correct, count = 0.0, 0, 0
    for start in range(0, windows.shape[0], batch):
        x = windows[start:start + batch].to(device)
        logits = model(x[:, :-1]).float()
        target = x[:, 1:]
        loss_sum += float(F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum"))
        correct += int((logits.argmax(-1) == target).sum())
        count += target.numel()
    return loss_sum / count, correct / count


def load_tasks(limit: int) -> list[dict]:
    with gzip.open(EVAL, "rt") as f:
        return [json.loads(line) for line in f][:limit]


def scorer():
    """reasoning-gym's scorer for the task where installed, else exact match (its 1.0 case)."""
    try:
        import reasoning_gym

        fn = reasoning_gym.get_score_answer_fn(TASK)
        return "reasoning_gym", lambda answer, entry: float(fn(answer, entry))
    except ImportError:
        return "exact_match", lambda answer, entry: float(answer.strip() == entry["answer"].strip())


@torch.no_grad()
def task_accuracy(model: Transformer, tokenizer, items: list[dict], score, max_new: int = 6) -> float:
    """Greedy answers to `items` (batched by prompt length, so no padding), cut at the first newline, scored."""
    device = next(model.parameters()).device
    encoded = [tokenizer.encode(prompt(item["question"])).ids for item in items]
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_len.setdefault(len(ids), []).append(i)
    total = 0.0
    for indices in by_len.values():
        x = torch.tensor([encoded[i] for i in indices], device=device)
        start = x.shape[1]
        for _ in range(max_new):
            x = torch.cat([x, model(x)[:, -1].argmax(-1, keepdim=True)], dim=1)
        for row, i in enumerate(indices):
            text = tokenizer.decode(x[row, start:].tolist())
            total += score(text.split("\n")[0].strip(), items[i])
    return total / len(items)


def upcycled(model: Transformer, factor: int, seed: int) -> Transformer:
    """A copy with `factor` x the experts: each expert and router row repeated, plus small noise so they differ."""
    gen = torch.Generator().manual_seed(seed)
    ids = [[e for e in range(layer.mlp.num_experts) for _ in range(factor)] for layer in model.layers]
    big = drop_experts(model, ids)
    with torch.no_grad():
        for layer in big.layers:
            for p, scale in ((layer.mlp.gate_proj, 1e-3), (layer.mlp.up_proj, 1e-3), (layer.mlp.down_proj, 1e-3),
                             (layer.mlp.router.weight, 1e-2)):
                p.add_(scale * p.std() * torch.randn(p.shape, generator=gen).to(p.device, p.dtype))
    return big


def stage1_cost(model: Transformer, calib: torch.Tensor, keep: float, device: torch.device,
                auto_sparsity: float | None) -> dict:
    """Wall time and forward passes of stage 1, co-selection and router-weight variants; and, given a sparsity,
    of the auto search for the expert fraction there (its co-selection pass, Wanda passes and loss evaluations)."""
    out = {}
    for similarity in ("coselect-output", "router"):
        opts = PruneOptions("stun", 1.0 - keep, experts_keep=keep, similarity=similarity)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        _, _, cost = cluster_experts(model, calib, keep, opts)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out[similarity] = {"seconds": time.perf_counter() - started, "forward_passes": cost["forward_passes"],
                           "search_iterations": cost["search_iterations"]}
    if auto_sparsity is not None:
        _, search = auto_experts_keep(model, calib, PruneOptions("stun", auto_sparsity, experts_keep="auto"))
        out["auto"] = {"seconds": search["seconds"], "forward_passes": search["forward_passes"],
                       "candidates": len(search["candidates"]), "chosen": search["chosen"]}
    return out


def engines(dirs: dict[str, Path], max_seqs: int, device: str, dtype: str) -> dict:
    """One engine per model directory, all alive at once so their timed rounds can interleave."""
    from glassbox.inference.llm import LLM

    return {name: LLM(path, device=device, dtype=dtype, num_kv_blocks=max_seqs * 16, max_num_seqs=max_seqs)
            for name, path in dirs.items()}


def decode_rate(llm, prompts: list[list[int]], new_tokens: int, device: str) -> float:
    """Generated tokens per second for `prompts` (greedy, EOS ignored so every sequence runs to the end)."""
    from glassbox.inference.sampling_params import SamplingParams

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - started)


def serve(dirs: dict[str, Path], prompts: list[list[int]], new_tokens: int, device: str, dtype: str,
          rounds: int) -> dict:
    """Weight bytes and median decode throughput per model, rounds interleaved so load drift hits all alike."""
    llms = engines(dirs, len(prompts), device, dtype)
    rates: dict[str, list[float]] = {name: [] for name in llms}
    for llm in llms.values():
        decode_rate(llm, prompts[:2], 4, device)                    # warm-up
    for _ in range(rounds):
        for name, llm in llms.items():
            rates[name].append(decode_rate(llm, prompts, new_tokens, device))
    out = {}
    for name, llm in llms.items():
        out[name] = {"weight_bytes": sum(p.numel() * p.element_size() for p in llm.engine.model.parameters()),
                     "decode_tokens_per_s": statistics.median(rates[name]), "rounds": rates[name]}
    return out


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    device = torch.device(args.device)
    started = time.perf_counter()
    load_at_start = os.getloadavg()[0]
    dense, cfg = load_hf_model_dir(args.model_dir, dtype=torch.float32, device=device)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(args.model_dir) / "tokenizer.json"))
    seq_len = min(args.seq_len, cfg.max_seq_len)
    calib = token_windows(args.data, args.calib_samples, seq_len, seed=0, vocab_size=cfg.vocab_size)
    val = token_windows(args.data, args.val_windows, seq_len, seed=1, vocab_size=cfg.vocab_size, split="valid")
    items = load_tasks(args.task_items)
    scorer_name, score = scorer()
    sparsities = [float(s) for s in args.sparsities.split(",")]
    specs = variants(args)

    def evaluate(model: Transformer) -> dict:
        loss, acc = val_metrics(model, val, args.batch)
        return {"val_loss": loss, "next_token_accuracy": acc,
                "task_accuracy": task_accuracy(model, tokenizer, items, score)}

    rows = [{"method": "dense", "sparsity": 0.0, **evaluate(dense), "experts": sum(
        layer.mlp.num_experts for layer in dense.layers)}]
    print(json.dumps(rows[-1]), flush=True)
    for s in sparsities:
        for method, spec in specs.items():
            t0 = time.perf_counter()
            pruned, report = prune(dense, calib, options(args, spec, s))
            prune_s = time.perf_counter() - t0
            search = report.stage1.get("keep_search")
            rows.append({"method": method, "sparsity": s, "achieved_sparsity": report.sparsity,
                         "experts": sum(report.experts_after), "experts_keep": report.experts_keep,
                         "prune_seconds": prune_s, **evaluate(pruned),
                         **({"keep_search": candidate_losses(search)} if search else {})})
            print(json.dumps(rows[-1]), flush=True)
            del pruned

    keep = serve_keep(args, rows, dense, calib)
    auto_sparsity = args.serve_sparsity if args.stun_expert_share == "auto" else None
    cost = {"experts_keep": keep, str(cfg.num_experts): stage1_cost(dense, calib, keep, device, auto_sparsity)}
    big = upcycled(dense, 2, seed=0)
    cost[str(2 * cfg.num_experts)] = stage1_cost(big, calib, keep, device, auto_sparsity)
    del big

    prompts = [w[:32].tolist() for w in val[:args.serve_batch]]
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    args.serve_dtype = dtype
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {"dense": Path(args.model_dir)}
        for method in ("stun", "unstructured", "expert_only"):
            opts = options(args, specs[method], args.serve_sparsity, keep if method == "stun" else None)
            pruned, report = prune(dense, calib, opts)
            dirs[method] = write_pruned_dir(pruned, Path(args.model_dir), Path(tmp) / method, report.to_dict())
            del pruned
        del dense
        if device.type == "cuda":
            torch.cuda.empty_cache()
        serving = serve(dirs, prompts, args.new_tokens, args.device, dtype, args.serve_repeats)
    base = serving["dense"]
    for name, r in serving.items():
        r["weight_ratio"] = r["weight_bytes"] / base["weight_bytes"] if base["weight_bytes"] else None
        r["throughput_ratio"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]

    dense_row = rows[0]
    val_loss = {"dense": dense_row["val_loss"]}
    task = {"dense": dense_row["task_accuracy"]}
    for s in sparsities:
        key = f"{s:g}"
        val_loss[key] = {r["method"]: r["val_loss"] for r in rows if r["sparsity"] == s and r["method"] != "dense"}
        task[key] = {r["method"]: r["task_accuracy"] for r in rows if r["sparsity"] == s and r["method"] != "dense"}
    high = [k for k in val_loss if k != "dense" and float(k) >= 0.4]
    summary = {
        "val_loss": val_loss,
        "task_accuracy": task,
        "stun_experts_keep": {f"{r['sparsity']:g}": r["experts_keep"] for r in rows if r["method"] == "stun"},
        "stun_beats_unstructured_at_every_sparsity_ge_0.4": all(
            val_loss[k]["stun"] < val_loss[k]["unstructured"] for k in high),
        "stun_0.4_val_loss_vs_dense": (val_loss["0.4"]["stun"] / val_loss["dense"] - 1.0) if "0.4" in val_loss
        else None,
        "stage1_forward_passes": {e: c["coselect-output"]["forward_passes"] for e, c in cost.items()
                                  if e != "experts_keep"},
        "stage1_seconds": {e: c["coselect-output"]["seconds"] for e, c in cost.items() if e != "experts_keep"},
        "serving_sparsity": args.serve_sparsity,
        "serving_weight_ratio": {k: v["weight_ratio"] for k, v in serving.items()},
        "serving_throughput_ratio": {k: v["throughput_ratio"] for k, v in serving.items()},
    }
    return {
        "machine": machine(device), "model_dir": str(args.model_dir), "data": str(args.data),
        "model": {"experts": cfg.num_experts, "top_k": cfg.experts_per_token, "layers": cfg.num_layers,
                  "params": cfg.num_params(), "active_params": cfg.num_params(active=True)},
        "settings": {k: v for k, v in vars(args).items() if k not in ("model_dir", "data")},
        "task": {"name": TASK, "items": len(items), "scorer": scorer_name},
        "summary": summary, "rows": rows, "stage1_cost": cost, "serving": serving,
        "wall_seconds": time.perf_counter() - started,
        "load_average": {"start": load_at_start, "end": os.getloadavg()[0], "cpus": os.cpu_count()},
    }


def variants(args: argparse.Namespace) -> dict[str, dict]:
    """The columns of the tables and how each prunes: the four methods, then STUN once more with each
    --compare-similarity distance (`stun_<distance>`), then with --owl STUN and Wanda with OWL's ratios."""
    specs = {m: {"method": m, "similarity": args.similarity, "owl": False} for m in METHODS}
    specs |= {f"stun_{sim}": {"method": "stun", "similarity": sim, "owl": False} for sim in args.compare_similarity}
    if getattr(args, "owl", False):
        specs |= {f"{m}_owl": {"method": m, "similarity": args.similarity, "owl": True}
                  for m in ("stun", "unstructured")}
    return specs


def columns(args: argparse.Namespace) -> list[str]:
    return list(variants(args))


def stun_keep(args: argparse.Namespace, sparsity: float) -> ExpertsKeep:
    """STUN's --experts-keep at `sparsity`: auto, or 1 - share x S for a numeric --stun-expert-share."""
    return "auto" if args.stun_expert_share == "auto" else 1.0 - args.stun_expert_share * sparsity


def options(args: argparse.Namespace, spec: dict, sparsity: float, keep: float | None = None) -> PruneOptions:
    """A column's pruning options at `sparsity`; `keep` fixes STUN's expert fraction (else stun_keep's)."""
    experts_keep = (keep if keep is not None else stun_keep(args, sparsity)) if spec["method"] == "stun" else None
    return PruneOptions(spec["method"], sparsity, experts_keep=experts_keep, similarity=spec["similarity"],
                        router=args.router, owl=spec["owl"], seed=args.seed, batch_size=args.batch)


def serve_keep(args: argparse.Namespace, rows: list[dict], dense: Transformer, calib: torch.Tensor) -> float:
    """STUN's expert fraction at the serving sparsity: its table row's (with auto, the one chosen there), else
    pruned once to find it."""
    for r in rows:
        if r["method"] == "stun" and r["sparsity"] == args.serve_sparsity:
            return r["experts_keep"]
    opts = options(args, variants(args)["stun"], args.serve_sparsity)
    return prune(dense, calib, opts)[1].experts_keep


def share_text(share: float | str) -> str:
    if share == "auto":
        return ("STUN's fraction of experts kept is chosen per sparsity by --experts-keep auto (the candidate in "
                "[1 - S, 1], 1 = Wanda alone, with the lowest loss on a held-out quarter of the calibration windows "
                "among 1 and those whose gain over 1 exceeds 2 paired standard errors over those windows)")
    return f"STUN drops {share:g} x S of the experts, then Wanda takes the rest"


def keep_table(rows: list[dict]) -> list[str]:
    """The auto search per sparsity: the fraction STUN kept and each candidate's held-out loss."""
    searched = [r for r in rows if r["method"] == "stun" and "keep_search" in r]
    if not searched:
        return []
    lines = ["", "STUN's expert fraction by the auto search (held-out calibration loss per candidate fraction):", "",
             "| sparsity | kept | experts | candidates |", "|---:|---:|---:|---|"]
    for r in searched:
        candidates = ", ".join(f"{k}: {v:.5f}" for k, v in r["keep_search"].items())
        lines.append(f"| {r['sparsity']:g} | {r['experts_keep']:g} | {r['experts']} | {candidates} |")
    return lines


def markdown(result: dict) -> str:
    s = result["summary"]
    auto = result["settings"]["stun_expert_share"] == "auto"
    methods = columns(argparse.Namespace(**result["settings"]))
    sparsities = [k for k in s["val_loss"] if k != "dense"]
    lines = [
        "# STUN: structured-then-unstructured MoE pruning",
        "",
        f"Machine: {result['machine']} (1-minute load average {result['load_average']['start']:.1f} at the "
        f"start, {result['load_average']['end']:.1f} at the end, on {result['load_average']['cpus']} CPUs: on a "
        f"shared box the throughput rounds carry that load's noise). "
        f"Model: {result['model']['params'] / 1e6:.1f}M parameters "
        f"({result['model']['active_params'] / 1e6:.1f}M active), {result['model']['layers']} layers x "
        f"{result['model']['experts']} experts, top-{result['model']['top_k']}. Sparsity counts expert weights "
        f"(dropped experts plus zeros in kept ones). {share_text(result['settings']['stun_expert_share'])}; "
        f"expert distance: {result['settings']['similarity']}, router rows: {result['settings']['router']}"
        + "".join(f"; stun_{sim}: STUN with distance {sim}" for sim in result["settings"]["compare_similarity"])
        + ("; stun_owl, unstructured_owl: with OWL's per-layer ratios" if result["settings"].get("owl") else "")
        + ". "
        f"Task: {result['task']['name']} ({result['task']['items']} held-out problems, scorer "
        f"{result['task']['scorer']}).",
        "",
        f"Validation loss (nats/token; dense {s['val_loss']['dense']:.5f}):",
        "",
        "| sparsity | " + " | ".join(methods) + " |",
        "|---:|" + "---:|" * len(methods),
    ]
    for k in sparsities:
        lines.append(f"| {k} | " + " | ".join(f"{s['val_loss'][k][m]:.5f}" for m in methods) + " |")
    lines += keep_table(result["rows"])
    lines += ["", f"Task accuracy (dense {s['task_accuracy']['dense']:.3f}):", "",
              "| sparsity | " + " | ".join(methods) + " |", "|---:|" + "---:|" * len(methods)]
    for k in sparsities:
        lines.append(f"| {k} | " + " | ".join(f"{s['task_accuracy'][k][m]:.3f}" for m in methods) + " |")
    lines += ["", f"STUN below unstructured at every sparsity >= 0.4: "
                  f"{s['stun_beats_unstructured_at_every_sparsity_ge_0.4']}; STUN at 0.4 vs dense loss: "
                  + (f"{100 * s['stun_0.4_val_loss_vs_dense']:+.2f}%" if s["stun_0.4_val_loss_vs_dense"] is not None
                     else "n/a"),
              "", f"Stage 1 cost (keeping {result['stage1_cost']['experts_keep']:g} of the experts"
                  + (f"; the auto search at S = {s['serving_sparsity']:g}" if auto else "") + "):", "",
              "| experts per layer | co-selection pass s | forward passes | router-weight s | forward passes |"
              + (" auto search s | forward passes |" if auto else ""),
              "|---:|---:|---:|---:|---:|" + ("---:|---:|" if auto else "")]
    for e, c in result["stage1_cost"].items():
        if e == "experts_keep":
            continue
        lines.append(f"| {e} | {c['coselect-output']['seconds']:.2f} | {c['coselect-output']['forward_passes']} | "
                     f"{c['router']['seconds']:.3f} | {c['router']['forward_passes']} |"
                     + (f" {c['auto']['seconds']:.2f} | {c['auto']['forward_passes']} |" if auto else ""))
    lines += ["", f"Serving at sparsity {s['serving_sparsity']:g} through the engine (greedy decode, "
                  f"{result['settings']['serve_batch']} sequences x {result['settings']['new_tokens']} tokens, median "
                  f"of {result['settings']['serve_repeats']} interleaved rounds, "
                  f"{result['settings']['serve_dtype']} weights). Unstructured zeros stay in dense tensors: no memory "
                  "or speed change is expected from them with dense kernels.", "",
              "| model | weights MB | vs dense | decode tok/s | vs dense |", "|---|---:|---:|---:|---:|"]
    for name, r in result["serving"].items():
        lines.append(f"| {name} | {r['weight_bytes'] / 1e6:.1f} | {r['weight_ratio']:.3f} | "
                     f"{r['decode_tokens_per_s']:.1f} | {r['throughput_ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    s = result["summary"]
    keys = [k for k in s["val_loss"] if k != "dense"]
    xs = [float(k) for k in keys]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, label in ((axes[0], "val_loss", "validation loss"), (axes[1], "task_accuracy", "task accuracy")):
        for m in columns(argparse.Namespace(**result["settings"])):
            ax.plot(xs, [s[metric][k][m] for k in keys], marker="o", label=m)
        ax.axhline(s[metric]["dense"], color="black", linestyle="--", label="dense")
        ax.set_xlabel("sparsity of expert weights")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(f"STUN vs baselines ({result['machine']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def expert_share(text: str) -> float | str:
    """--stun-expert-share: 'auto' or a share in [0, 1]."""
    if text == "auto":
        return text
    try:
        share = float(text)
    except ValueError:
        share = float("nan")
    if not 0.0 <= share <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: a share in [0, 1] or 'auto'")
    return share


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, required=True, help="the trained MoE (HF directory, with tokenizer)")
    p.add_argument("--data", type=Path, required=True, help="its prepared data directory (train and valid splits)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--sparsities", default="0.2,0.3,0.4,0.5,0.6")
    p.add_argument("--stun-expert-share", type=expert_share, default="auto",
                   help="STUN removes this share of the target sparsity as whole experts (experts_keep = 1 - x S), "
                        "or 'auto': --experts-keep auto chooses the fraction per sparsity (default: auto)")
    p.add_argument("--similarity", choices=SIMILARITIES, default="coselect-output",
                   help="stage 1's expert distance for stun and expert_only (default: coselect-output)")
    p.add_argument("--compare-similarity", type=lambda v: [x for x in v.split(",") if x], default=["coselect"],
                   help="comma-separated distances to run STUN with as well, as methods stun_<distance> "
                        "(default: coselect, the paper's plain co-selection; '' for none)")
    p.add_argument("--router", choices=["keep", "mean"], default="keep")
    p.add_argument("--owl", action="store_true",
                   help="also STUN and Wanda with OWL's per-layer ratios, as methods stun_owl and unstructured_owl")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--val-windows", type=int, default=128)
    p.add_argument("--task-items", type=int, default=500)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--serve-sparsity", type=float, default=0.4)
    p.add_argument("--serve-batch", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--serve-repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: a shared box)")
    p.add_argument("--out-name", default=None, help="results name (default: stun on a GPU, stun_cpu on the CPU)")
    args = p.parse_args(argv)
    if args.out_name is None:
        args.out_name = "stun_cpu" if torch.device(args.device).type == "cpu" else "stun"
    torch.set_num_threads(args.threads)
    result = run(args)
    RESULTS.mkdir(exist_ok=True)
    from glassbox.atomic import write_json, write_text

    write_json(RESULTS / f"{args.out_name}.json", result)
    write_text(RESULTS / f"{args.out_name}.md", markdown(result))
    plot(result, RESULTS / f"{args.out_name}.png")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
