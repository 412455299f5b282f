"""Checkpoint I/O: glassbox's save and load against plain sequential file write/read on the same disk.

One process, one model + AdamW state (weights and two moments, fp32), measured side by side in the same run:

- baseline write: the same number of bytes written to one file in 64 MiB blocks, then fsync. baseline read:
  read back in 64 MiB blocks. These are what the disk (and page cache) give a single sequential stream.
- save (sync): `Checkpointer.save` end to end: DCP shards, RNG and loop state, fsync, sha256 of every file,
  MANIFEST.json, rename, `latest`. MB/s counts the checkpoint's bytes.
- load (verified): `load_checkpoint` with hash verification (every byte read and hashed, then loaded);
  load (trusted): the same without verification, as a resume after `--resume auto` already verified.
- async save: the time training is blocked, as the extra time of "save, then one training step" over the step
  alone (on GPU the device-to-host copy overlaps that step and its optimizer update waits for it), against the
  same for a sync save; the background write has to finish before the next save.

Each figure is the median of --repeats runs. Reads come from the page cache when the checkpoint fits in memory
(no cache dropping on a shared machine); the baseline read has the same advantage, so the ratio is fair.
Writes bench/results/checkpoint_io.json and checkpoint_io.md (GPU runs: --tag gpu, checkpoint_io_gpu.*).

    python bench/checkpoint_io.py                       # 34M parameters, a 0.4 GB checkpoint, on CPU
    python bench/checkpoint_io.py --hidden 1024 --layers 8 --vocab 32000 --device cuda --tag gpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
BLOCK = 64 * 1024 * 1024


def _median(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step(state, vocab: int, device: torch.device) -> None:
    ids = torch.randint(0, vocab, (2, 65), device=device)
    logits = state.model(ids[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    _sync(device)


def build_state(args, run_dir: Path):
    from glassbox.models.transformer import ModelConfig, Transformer
    from glassbox.train.state import TrainState

    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                      num_heads=args.hidden // 64, num_kv_heads=args.hidden // 64, intermediate_size=args.hidden * 4,
                      max_seq_len=128, tie_embeddings=False)
    device = torch.device(args.device)
    model = Transformer(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
    state = TrainState(config=None, run_dir=run_dir, model=model, optimizer=optimizer, lr_scheduler=scheduler,
                       sampler=None, step_plan=None, step=1)
    train_step(state, cfg.vocab_size, device)
    return state, cfg


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def baseline_write(path: Path, nbytes: int) -> None:
    block = os.urandom(1 << 20) * (BLOCK >> 20)
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            n = min(left, BLOCK)
            f.write(block[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())


def baseline_read(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(BLOCK):
            pass


def run(args) -> dict:
    from glassbox.checkpoints.checkpointer import Checkpointer
    from glassbox.checkpoints.config import CheckpointConfig
    from glassbox.checkpoints.loading import load_checkpoint

    work = Path(tempfile.mkdtemp(prefix="ckpt_io_", dir=args.dir))
    try:
        state, cfg = build_state(args, work / "run")
        device = torch.device(args.device)
        sync_ckpt = Checkpointer(CheckpointConfig(), work / "run", log=lambda m: None)
        path = sync_ckpt.save(state)                 # warm-up: allocations, imports, first directory
        nbytes = tree_bytes(path)
        mb = nbytes / 1e6

        def save_sync():
            state.step += 1
            sync_ckpt.save(state)

        t_save, all_save = _median(save_sync, args.repeats)
        latest = sync_ckpt.root / (sync_ckpt.root / "latest").read_text().strip()

        def load(verify: bool):
            load_checkpoint(latest, state, verify_hashes=verify)
            _sync(device)

        t_load_v, all_load_v = _median(lambda: load(True), args.repeats)
        t_load_t, all_load_t = _median(lambda: load(False), args.repeats)

        blob = work / "baseline.bin"
        t_write, all_write = _median(lambda: baseline_write(blob, nbytes), args.repeats)
        t_read, all_read = _median(lambda: baseline_read(blob), args.repeats)

        # The stall: how much longer "save, then the next training step" takes than the step alone. An async
        # save on GPU overlaps its device-to-host copy with that step, whose optimizer update waits for it.
        step = lambda: train_step(state, cfg.vocab_size, device)   # noqa: E731
        t_step, _ = _median(step, args.repeats + 2)
        async_ckpt = Checkpointer(CheckpointConfig(async_save=True), work / "run_async", log=lambda m: None)
        async_ckpt.save(state)                       # warm-up (the staging buffers are allocated once)
        async_ckpt.wait()

        def stalls_of(ckpt) -> tuple[list[float], list[float], list[float]]:
            stalls, logged, totals = [], [], []
            for _ in range(args.repeats):
                state.step += 1
                t0 = time.perf_counter()
                ckpt.save(state)
                step()
                stalls.append(time.perf_counter() - t0 - t_step)
                logged.append(ckpt.last_stall_s)
                ckpt.wait()
                totals.append(time.perf_counter() - t0)
            return stalls, logged, totals

        stalls, logged, totals = stalls_of(async_ckpt)
        sync_stalls, sync_logged, _ = stalls_of(sync_ckpt)
        t_stall = statistics.median(stalls)
        t_sync_stall = statistics.median(sync_stalls)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def row(name, seconds, runs, base=None):
        out = {"name": name, "seconds": seconds, "MB_per_s": mb / seconds, "runs": runs}
        if base is not None:
            out["vs_baseline"] = base / seconds
        return out

    return {
        "bench": "checkpoint_io",
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "host": platform.node(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
        "torch": torch.__version__, "disk_dir": str(args.dir or tempfile.gettempdir()),
        "model": {"params": cfg.num_params(), "hidden": cfg.hidden_size, "layers": cfg.num_layers,
                  "vocab": cfg.vocab_size},
        "checkpoint_MB": mb, "repeats": args.repeats,
        "rows": [
            row("baseline write (sequential + fsync)", t_write, all_write),
            row("save (sync, hashed, committed)", t_save, all_save, t_write),
            row("baseline read (sequential)", t_read, all_read),
            row("load (verified)", t_load_v, all_load_v, t_read),
            row("load (trusted)", t_load_t, all_load_t, t_read),
        ],
        "train_step_s": t_step,
        "async": {"stall_s": t_stall, "stall_runs": stalls, "total_s": statistics.median(totals),
                  "logged_stall_s": statistics.median(logged), "sync_logged_stall_s": statistics.median(sync_logged),
                  "sync_stall_s": t_sync_stall, "sync_stall_runs": sync_stalls,
                  "stall_reduction": t_sync_stall / t_stall},
    }


def markdown(result: dict) -> str:
    m = result["model"]
    lines = [
        f"# checkpoint I/O ({result['device']}, {result['cpus']} CPUs, torch {result['torch']})",
        "",
        f"Model {m['params'] / 1e6:.1f}M parameters (hidden {m['hidden']}, {m['layers']} layers, vocab {m['vocab']}) "
        f"+ AdamW: a {result['checkpoint_MB']:.0f} MB checkpoint. Medians of {result['repeats']} runs.",
        "",
        "| operation | seconds | MB/s | vs sequential baseline |",
        "|---|---:|---:|---:|",
    ]
    for r in result["rows"]:
        ratio = f"{r['vs_baseline']:.2f}x" if "vs_baseline" in r else "1.00x (baseline)"
        lines.append(f"| {r['name']} | {r['seconds']:.3f} | {r['MB_per_s']:.0f} | {ratio} |")
    a = result["async"]
    lines += [
        "",
        f"Training stall per save, two ways: the extra time of (save + next training step) over the step alone "
        f"({result['train_step_s'] * 1000:.0f} ms), which also counts a background writer competing with the "
        f"step for cores; and the time save() and the optimizer's wait for staging blocked, as logged.",
        "",
        "| save mode | extra time of save + step (s) | blocked, as the checkpointer logs it (s) | committed after (s) |",
        "|---|---:|---:|---:|",
        f"| sync | {a['sync_stall_s']:.3f} | {a['sync_logged_stall_s']:.3f} | {a['sync_logged_stall_s']:.3f} |",
        f"| async | {a['stall_s']:.3f} | {a['logged_stall_s']:.3f} | {a['total_s']:.3f} |",
        "",
        f"Per save, async blocks training {a['stall_s']:.3f} s against {a['sync_stall_s']:.3f} s for sync "
        f"(sync / async = {a['stall_reduction']:.1f}x).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="folder on the disk to measure (default: the temp folder)")
    p.add_argument("--tag", default="", help="suffix for the result files (e.g. gpu)")
    args = p.parse_args()
    result = run(args)
    name = "checkpoint_io" + (f"_{args.tag}" if args.tag else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
