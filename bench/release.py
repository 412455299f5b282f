"""What a full release costs next to the training it documents: build, verify, analyze and reproduce times.

Trains the `tiny` config (vocab reduced to the prepared store's) for a few steps with a checkpoint every
`--every` steps, then times, in one process, side by side:

- the training steps themselves (median `step_time` from metrics.jsonl),
- `release build` (export + measure every checkpoint, copy the data, cards, manifest),
- `release verify` (hash every file, load every branch in transformers, probe logits),
- `release analyze` (perplexity, memorization, weight norms per checkpoint),
- `reproduce` of the last checkpoint interval (the real Trainer replaying logged steps), reported per replayed
  step and as a ratio to the median training step,

plus the run and release sizes. Each timed command runs `--repeats` times on fresh copies; the table shows
medians.

    python bench/release.py                       # CPU, ~2 minutes
    python bench/release.py --steps 40 --every 10 --repeats 3

Writes bench/results/release.json and bench/results/release.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, help="a prepared DATA_DIR (default: prepare 300 KB of stdlib)")
    args = parser.parse_args()

    import torch

    from glassbox.data.prepare import prepare
    from glassbox.data.store import TokenStore
    from glassbox.release.analyze import AnalyzeOptions, analyze_release
    from glassbox.release.build import BuildOptions, build_release
    from glassbox.release.reproduce import from_run, reproduce
    from glassbox.release.verify import verify_release
    from glassbox.train.config import load_run_config
    from glassbox.train.metrics_log import read_metrics
    from glassbox.train.trainer import Trainer

    work = Path(tempfile.mkdtemp(prefix="glassbox-bench-release-"))
    try:
        data = args.data
        if data is None:
            data = work / "data"
            prepare(["stdlib"], data, vocab_size=512, max_bytes=300_000, progress=False)
        vocab = TokenStore(data).vocab_size
        run = work / "run"
        cfg = load_run_config(CONFIG, [
            f"data.path={data}", f"run_dir={run}", f"model.vocab_size={vocab}", f"schedule.steps={args.steps}",
            f"schedule.warmup_steps={min(5, args.steps)}", f"checkpoint.every={args.every}",
            "logging.val_every=0", "logging.val_samples=16", "logging.progress=false",
            "logging.wandb.mode=disabled",
        ])
        Trainer(cfg).fit()
        step_times = [r["step_time"] for r in read_metrics(run)][1:]   # the first step pays one-off setup
        train_step = statistics.median(step_times)

        builds, verifies, analyses, replays = [], [], [], []
        for i in range(args.repeats):
            out = work / f"release{i}"
            builds.append(timed(lambda: build_release(run, out, BuildOptions(repo_id="bench/tiny"))))
            verifies.append(timed(lambda: verify_release(out)))
            analyses.append(timed(lambda: analyze_release(out, AnalyzeOptions())))
            result = None

            def replay():
                nonlocal result
                result = reproduce(from_run(run), args.steps)
            replays.append(timed(replay))
            assert result is not None and result.bit_exact, "reproduce was not bit-exact"
        replayed_steps = result.step - result.from_step
        row = {
            "device": "cpu", "torch": torch.__version__, "python": platform.python_version(),
            "model_params": cfg.model.num_params(), "steps": args.steps, "checkpoints": args.steps // args.every,
            "train_step_s": train_step, "train_total_s": sum(r["step_time"] for r in read_metrics(run)),
            "build_s": statistics.median(builds), "verify_s": statistics.median(verifies),
            "analyze_s": statistics.median(analyses), "reproduce_s": statistics.median(replays),
            "reproduce_steps": replayed_steps,
            "reproduce_per_step_over_train_step": statistics.median(replays) / replayed_steps / train_step,
            "run_bytes": tree_bytes(run), "release_bytes": tree_bytes(work / "release0"),
            "repeats": args.repeats,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "release.json").write_text(json.dumps(row, indent=2, sort_keys=True) + "\n")
    md = [
        "# Release costs (tiny config, CPU)",
        "",
        f"{row['model_params']:,} parameters, {row['steps']} steps, {row['checkpoints']} checkpoints; "
        f"medians of {row['repeats']} repeats; torch {row['torch']}.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| training step (median) | {row['train_step_s']:.3f} s |",
        f"| training, all steps | {row['train_total_s']:.2f} s |",
        f"| release build | {row['build_s']:.2f} s |",
        f"| release verify | {row['verify_s']:.2f} s |",
        f"| release analyze | {row['analyze_s']:.2f} s |",
        f"| reproduce ({row['reproduce_steps']} steps, bit-exact) | {row['reproduce_s']:.2f} s |",
        f"| reproduce time per step / training step | {row['reproduce_per_step_over_train_step']:.2f}x |",
        f"| run directory | {row['run_bytes'] / 2**20:.1f} MiB |",
        f"| release directory | {row['release_bytes'] / 2**20:.1f} MiB |",
        "",
    ]
    (RESULTS / "release.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
