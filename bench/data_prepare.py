"""Data pipeline throughput: `glassbox data prepare` against `tokenizers`' own encode_batch, and the sampler.

Measured side by side in one process on the same text (the standard library's .py files, or a prefix of them
with --max-bytes):

- prepare (train BPE): `prepare(["stdlib"], ...)` end to end: read and hash the sources, train the BPE, encode,
  write the megatron .bin/.idx files and meta.json. tokens/s = tokens stored / wall time.
- prepare (given tokenizer): the same with `--tokenizer` (no BPE training): the path a second corpus takes.
- ceiling: `Tokenizer.encode_batch` over every document in one call with the same tokenizer, nothing else: the
  fastest the tokenization alone can go on this machine. prepare / ceiling says what the pipeline around it costs.
- sampler: `GlobalSampler.next_batch` batches/s at a few (seq_len, global batch) shapes, index cache warm, plus
  the one-off cold build of the epoch index (megatron-core's GPTDataset indices).

Each figure is the median of --repeats runs; the prepare paths and the ceiling run interleaved, one of each per
round, so load from other processes on a shared machine falls on all of them alike. Writes bench/results/data_prepare.json and data_prepare.md.

    python bench/data_prepare.py                      # full stdlib, 3 repeats
    python bench/data_prepare.py --max-bytes 2000000  # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SAMPLER_SHAPES = ((256, 32), (1024, 64), (2048, 256))


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _median_times_interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, run in rounds (one of each per round), so that load from other
    processes on a shared machine falls on all of them alike rather than on whichever ran at a bad moment."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_prepare(work: Path, vocab: int, max_bytes: int | None, repeats: int) -> dict:
    from glassbox.data.prepare import prepare
    from glassbox.data.sources import read_source
    from glassbox.data.tokenizer import load_tokenizer

    runs = iter(range(10**6))

    def fresh(**kwargs):
        out = work / f"prep{next(runs)}"
        result = prepare(["stdlib"], out, vocab_size=vocab, max_bytes=max_bytes, progress=False, **kwargs)
        return out, result

    first_dir, first = fresh()
    tokens = sum(s["tokens"] for s in first.meta["sources"])
    docs = read_source("stdlib", max_bytes).documents
    tok = load_tokenizer(first_dir / "tokenizer.json")
    t = _median_times_interleaved(
        {
            "train": lambda: fresh(),
            "given": lambda: fresh(tokenizer=first_dir / "tokenizer.json"),
            "read": lambda: read_source("stdlib", max_bytes),
            "ceiling": lambda: tok.encode_batch(docs, add_special_tokens=False),
        },
        repeats,
    )
    t_train, t_given, t_read, t_ceiling = t["train"], t["given"], t["read"], t["ceiling"]
    encoded = sum(len(e.ids) for e in tok.encode_batch(docs, add_special_tokens=False)) + len(docs)
    assert encoded == tokens, (encoded, tokens)
    return {
        "documents": len(docs),
        "bytes": sum(s["bytes"] for s in first.meta["sources"]),
        "tokens": tokens,
        "vocab_size": vocab,
        "seconds": {"prepare_train_bpe": t_train, "prepare_given_tokenizer": t_given, "read_sources": t_read,
                    "encode_batch_ceiling": t_ceiling},
        "tokens_per_s": {
            "prepare_train_bpe": tokens / t_train,
            "prepare_given_tokenizer": tokens / t_given,
            "encode_batch_ceiling": tokens / t_ceiling,
        },
        "ratio_to_ceiling": {"prepare_train_bpe": t_ceiling / t_train, "prepare_given_tokenizer": t_ceiling / t_given},
        "data_dir": first_dir,
    }


def bench_sampler(data_dir: Path, work: Path, repeats: int, steps: int) -> list[dict]:
    from glassbox.data.config import DataConfig
    from glassbox.data.sampler import build_sampler
    from glassbox.data.store import TokenStore

    tokens = TokenStore(data_dir).split_tokens("train")
    rows = []
    for seq_len, batch in SAMPLER_SHAPES:
        if (tokens - 1) // seq_len < batch:
            continue
        cfg = DataConfig(path=str(data_dir), seq_len=seq_len, seed=1)
        cache = work / f"cache-{seq_len}"
        t0 = time.perf_counter()
        build_sampler(cfg, cache_dir=cache)
        cold = time.perf_counter() - t0
        sampler = build_sampler(cfg, cache_dir=cache)

        def run():
            for _ in range(steps):
                sampler.next_batch(batch)

        t = _median_time(run, repeats)
        rows.append({
            "seq_len": seq_len,
            "global_batch": batch,
            "epoch_samples": sampler.epoch_size,
            "index_build_s": cold,
            "batches_per_s": steps / t,
            "samples_per_s": steps * batch / t,
            "tokens_per_s": steps * batch * seq_len / t,
        })
    return rows


def write_markdown(result: dict, path: Path) -> None:
    p = result["prepare"]
    lines = [
        "# data prepare and sampler throughput",
        "",
        f"Corpus: stdlib .py files, {p['documents']} documents, {p['bytes'] / 1e6:.1f} MB, {p['tokens'] / 1e6:.2f} M "
        f"tokens, vocab {p['vocab_size']}. {result['machine']}. Medians of {result['repeats']} interleaved runs. "
        "On a machine shared with other jobs the absolute rates move with their load; the ratios to the ceiling, "
        "measured in the same rounds, are the stable figures.",
        "",
        "| path | seconds | tokens/s | vs encode_batch ceiling |",
        "|---|---:|---:|---:|",
    ]
    for key, label in (("prepare_train_bpe", "`data prepare` (trains BPE)"),
                       ("prepare_given_tokenizer", "`data prepare --tokenizer` (no training)"),
                       ("encode_batch_ceiling", "`tokenizers` encode_batch alone (ceiling)")):
        ratio = p["ratio_to_ceiling"].get(key, 1.0)
        lines.append(f"| {label} | {p['seconds'][key]:.2f} | {p['tokens_per_s'][key] / 1e6:.2f} M | {ratio:.2f}x |")
    lines += [f"| reading + hashing the sources alone | {p['seconds']['read_sources']:.2f} | | |", "",
              "| sampler seq_len | global batch | epoch samples | cold index build s | batches/s | tokens/s |",
              "|---:|---:|---:|---:|---:|---:|"]
    for r in result["sampler"]:
        lines.append(f"| {r['seq_len']} | {r['global_batch']} | {r['epoch_samples']} | {r['index_build_s']:.2f} | "
                     f"{r['batches_per_s']:.0f} | {r['tokens_per_s'] / 1e6:.1f} M |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-bytes", type=int, default=None, help="stdlib prefix to use (default: all of it)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sampler-steps", type=int, default=200)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="glassbox-bench-data-"))
    try:
        prep = bench_prepare(work, args.vocab_size, args.max_bytes, args.repeats)
        sampler = bench_sampler(prep.pop("data_dir"), work, args.repeats, args.sampler_steps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "repeats": args.repeats,
        "max_bytes": args.max_bytes,
        "prepare": prep,
        "sampler": sampler,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "data_prepare.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, RESULTS / "data_prepare.md")
    print((RESULTS / "data_prepare.md").read_text())


if __name__ == "__main__":
    main()
