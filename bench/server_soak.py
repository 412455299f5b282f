"""Soak of the real `glassbox serve`: a mix of normal, streaming, bad and disconnecting requests for --duration
seconds, with the server's RSS sampled over time.

The server runs as its own process (`glassbox serve`, default limits, an API key from $GLASSBOX_API_KEY) on a
random-init Llama with a byte-level tokenizer, so its RSS is its own. --concurrency clients loop until the
deadline, each request drawn by weight from:

- normal: a completion or chat request, greedy or sampled, 8-48 tokens; must answer 200.
- stream: the same, streamed, read to `data: [DONE]`; must answer 200 and finish.
- bad: a body the server must refuse with a 4xx (values the engine cannot use, lone surrogates, invalid UTF-8,
  non-JSON, an unknown model, no key, a body over the size limit, too many prompts); a 5xx counts as an error.
- disconnect: a stream dropped after a few events, a non-streaming request abandoned by a client timeout, or a
  request sent half-way and abandoned (slowloris).

At the end the server must still answer the first greedy request's exact text, with every KV block back in the
pool. Writes bench/results/<--out-name>.json (top-level `summary`: requests, errors by kind, latency p50/p99, RSS
start/end/max, machine) and .md. Not run in CI: it takes --duration (default 10 minutes).

    python bench/server_soak.py --duration 120
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import numpy as np
import psutil

RESULTS = Path(__file__).resolve().parent / "results"
KEY = "soak-key"
MODEL = "soak"
EOS = "<|endoftext|>"
WORDS = ("def", "return", "import", "class", "self", "for", "in", "if", "else", "text", "width", "lines", "(", ")",
         ":", "=", "\n    ", "wrap", "split", "join", "None", "True", "0", "1", "#", "'", "é", "日本")
KIND_WEIGHTS = {"normal": 4, "stream": 3, "bad": 2, "disconnect": 2}


def make_model_dir(out: Path) -> Path:
    """A random-init Llama (4 x 256, ~4M parameters) with a byte-level BPE tokenizer of no merges: 256 byte tokens
    and EOS, so any text round-trips."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab[EOS] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                      initializer_range=0.02, tie_word_embeddings=False, bos_token_id=vocab[EOS],
                      eos_token_id=vocab[EOS])
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS, "bos_token": EOS}))
    return out


def start_server(model_dir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-c", "import sys; from glassbox.cli import main; sys.exit(main())", "serve",
               str(model_dir), "--port", str(port), "--served-model-name", MODEL]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "GLASSBOX_API_KEY": KEY, "OMP_NUM_THREADS": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start:\n{log.read_text()}")
        time.sleep(0.2)


def text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def sampling(rng: random.Random) -> dict:
    if rng.random() < 0.5:
        return {"temperature": 0}
    return {"temperature": 0.8, "top_p": 0.95, "seed": rng.randint(0, 2**31), "n": rng.choice([1, 1, 2, 4])}


def good_request(rng: random.Random, stream: bool) -> tuple[str, dict]:
    body = {"model": MODEL, "max_tokens": rng.randint(8, 48), "stream": stream, **sampling(rng)}
    if rng.random() < 0.3:
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": text(rng, 3, 30)}]}
    if rng.random() < 0.2:
        body["stop"] = [rng.choice(WORDS[:10])]
    return "/v1/completions", {**body, "prompt": text(rng, 3, 60)}


def bad_requests() -> list[tuple[str, bytes, dict, int]]:
    """(name, body, headers, expected status)."""
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}

    def body(**fields) -> bytes:
        return json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 4, **fields}).encode()

    return [
        ("top_p_tiny", body(top_p=1e-300, temperature=1), auth, 400),
        ("top_k_huge", body(top_k=10**30, temperature=1), auth, 400),
        ("repetition_penalty_tiny", body(repetition_penalty=1e-40, temperature=1), auth, 400),
        ("seed_2_64", body(seed=2**64, temperature=1), auth, 400),
        ("empty_stop", body(stop=""), auth, 400),
        ("lone_surrogate", b'{"model": "%s", "prompt": "a \\ud800"}' % MODEL.encode(), auth, 400),
        ("invalid_utf8", b'{"model": "%s", "prompt": "\xff\xfe"}' % MODEL.encode(), auth, 400),
        ("not_json", b"{not json", auth, 400),
        ("nan", b'{"model": "%s", "prompt": "x", "temperature": NaN}' % MODEL.encode(), auth, 400),
        ("unknown_model", json.dumps({"model": "gpt-4", "prompt": "x"}).encode(), auth, 404),
        ("no_key", body(), {"Content-Type": "application/json"}, 401),
        ("too_many_prompts", json.dumps({"model": MODEL, "prompt": ["x"] * 100, "n": 32}).encode(), auth, 400),
        ("body_5mb", body(prompt="x" * (5 * 2**20)), auth, 413),
    ]


class Soak:
    def __init__(self, base: str, seed: int):
        self.base = base
        self.rng = random.Random(seed)
        self.bad = bad_requests()
        self.outcomes: dict[str, Counter] = defaultdict(Counter)
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.auth = {"Authorization": f"Bearer {KEY}"}

    async def normal(self, client: httpx.AsyncClient) -> str:
        path, body = good_request(self.rng, stream=False)
        t0 = time.monotonic()
        r = await client.post(f"{self.base}{path}", json=body, headers=self.auth)
        if r.status_code != 200:
            return f"status_{r.status_code}"
        self.latency["normal"].append(time.monotonic() - t0)
        return "ok"

    async def stream(self, client: httpx.AsyncClient) -> str:
        path, body = good_request(self.rng, stream=True)
        t0 = time.monotonic()
        first, done = None, False
        async with client.stream("POST", f"{self.base}{path}", json=body, headers=self.auth) as r:
            if r.status_code != 200:
                return f"status_{r.status_code}"
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if first is None:
                    first = time.monotonic() - t0
                if line == "data: [DONE]":
                    done = True
                elif "error" in json.loads(line[6:]):
                    return "error_event"
        if not done:
            return "unfinished_stream"
        self.latency["stream"].append(time.monotonic() - t0)
        self.latency["stream_ttft"].append(first)
        return "ok"

    async def bad_request(self, client: httpx.AsyncClient) -> str:
        name, body, headers, expected = self.rng.choice(self.bad)
        r = await client.post(f"{self.base}/v1/completions", content=body, headers=headers)
        if r.status_code >= 500:
            return f"{name}_status_{r.status_code}"
        if r.status_code != expected or set(r.json()) != {"error"}:
            return f"{name}_unexpected_{r.status_code}"
        return "ok"

    async def disconnect(self, client: httpx.AsyncClient) -> str:
        how = self.rng.choice(["mid_stream", "client_timeout", "half_sent"])
        path, body = good_request(self.rng, stream=how == "mid_stream")
        body["max_tokens"] = 200
        body["ignore_eos"] = True
        if how == "mid_stream":
            async with client.stream("POST", f"{self.base}{path}", json=body, headers=self.auth) as r:
                events = 0
                async for line in r.aiter_lines():
                    events += line.startswith("data: ")
                    if events >= self.rng.randint(1, 4):
                        break
            return "ok"
        if how == "client_timeout":
            try:
                await client.post(f"{self.base}{path}", json=body, headers=self.auth, timeout=0.1)
            except httpx.TimeoutException:
                pass
            return "ok"
        host, port = self.base.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        raw = json.dumps(body).encode()
        writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Length: {len(raw)}"
                     "\r\nContent-Type: application/json\r\n\r\n".encode() + raw[:len(raw) // 2])
        await writer.drain()
        await asyncio.sleep(self.rng.uniform(0.2, 2.0))
        writer.close()
        return "ok"

    async def worker(self, deadline: float) -> None:
        kinds, weights = zip(*KIND_WEIGHTS.items())
        async with httpx.AsyncClient(timeout=120) as client:
            while time.monotonic() < deadline:
                kind = self.rng.choices(kinds, weights)[0]
                try:
                    outcome = await getattr(self, "bad_request" if kind == "bad" else kind)(client)
                except httpx.HTTPError as e:
                    outcome = f"transport_{type(e).__name__}"
                self.outcomes[kind][outcome] += 1


async def sample_rss(proc: psutil.Process, deadline: float, every: float, out: list[tuple[float, float]]) -> None:
    t0 = time.monotonic()
    while time.monotonic() < deadline:
        out.append((round(time.monotonic() - t0, 1), proc.memory_info().rss / 2**20))
        await asyncio.sleep(every)
    out.append((round(time.monotonic() - t0, 1), proc.memory_info().rss / 2**20))


def greedy(base: str) -> str:
    r = httpx.post(f"{base}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                   json={"model": MODEL, "prompt": "def wrap(text, width=70):", "max_tokens": 32, "temperature": 0})
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


def kv_blocks_used(base: str, timeout: float = 30) -> float:
    deadline = time.monotonic() + timeout
    while True:
        lines = httpx.get(f"{base}/metrics").text.splitlines()
        used = float(next(line.split()[1] for line in lines if line.startswith("glassbox_kv_cache_blocks_used ")))
        if used == 0 or time.monotonic() > deadline:
            return used
        time.sleep(0.2)


def ms(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else None


def run(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or make_model_dir(Path(tmp) / "model")
        proc, base = start_server(model_dir, Path(tmp) / "serve.log")
        try:
            ps = psutil.Process(proc.pid)
            reference = greedy(base)
            soak = Soak(base, args.seed)
            rss: list[tuple[float, float]] = []

            async def main() -> None:
                deadline = time.monotonic() + args.duration
                await asyncio.gather(sample_rss(ps, deadline, args.rss_every, rss),
                                     *(soak.worker(deadline) for _ in range(args.concurrency)))

            t0 = time.monotonic()
            asyncio.run(main())
            elapsed = time.monotonic() - t0
            same_text = greedy(base) == reference
            blocks = kv_blocks_used(base)
            log = (Path(tmp) / "serve.log").read_text()
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    requests = {kind: sum(c.values()) for kind, c in soak.outcomes.items()}
    errors = {kind: {k: v for k, v in c.items() if k != "ok"} for kind, c in soak.outcomes.items()}
    values = [v for _, v in rss]
    summary = {
        "machine": args.machine or f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
        "duration_s": round(elapsed, 1),
        "concurrency": args.concurrency,
        "requests": sum(requests.values()),
        "requests_by_kind": requests,
        "errors": sum(sum(e.values()) for e in errors.values()),
        "errors_by_kind": errors,
        "latency_ms": {name: {"p50": ms(v, 50), "p99": ms(v, 99), "count": len(v)}
                       for name, v in sorted(soak.latency.items())},
        "rss_mib": {"start": round(values[0], 1), "end": round(values[-1], 1), "max": round(max(values), 1)},
        "after": {"same_greedy_text": same_text, "kv_blocks_used": blocks,
                  "server_log_bytes": len(log), "server_log_tail": log[-1000:]},
    }
    return {"summary": summary, "rss_mib_over_time": [[t, round(v, 1)] for t, v in rss],
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}


def write_results(args, result: dict) -> None:
    from glassbox.atomic import write_json, write_text

    s = result["summary"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"{args.out_name}.json", result)
    lines = [
        f"# Server soak ({s['machine']})",
        "",
        f"`python bench/server_soak.py --duration {args.duration:g}`: {s['duration_s']} s, {s['concurrency']} "
        f"clients, {s['requests']} requests, {s['errors']} errors. Afterwards: the first greedy request's text "
        f"{'unchanged' if s['after']['same_greedy_text'] else 'CHANGED'}, KV blocks in use "
        f"{s['after']['kv_blocks_used']:g}, server log {s['after']['server_log_bytes']} bytes.",
        "",
        "| kind | requests | errors |",
        "|---|---:|---|",
    ]
    for kind, n in sorted(s["requests_by_kind"].items()):
        errs = ", ".join(f"{k}: {v}" for k, v in sorted(s["errors_by_kind"][kind].items())) or "none"
        lines.append(f"| {kind} | {n} | {errs} |")
    lines += ["", "| latency | p50 ms | p99 ms | count |", "|---|---:|---:|---:|"]
    for name, v in s["latency_ms"].items():
        lines.append(f"| {name} | {v['p50']} | {v['p99']} | {v['count']} |")
    rss = s["rss_mib"]
    lines += ["", "| RSS MiB | start | end | max |", "|---|---:|---:|---:|",
              f"| server | {rss['start']} | {rss['end']} | {rss['max']} |"]
    write_text(RESULTS / f"{args.out_name}.md", "\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=600, help="seconds of load (default: 600)")
    p.add_argument("--concurrency", type=int, default=16, help="clients at once (default: 16)")
    p.add_argument("--model-dir", type=Path, default=None, help="a HF model directory with tokenizer.json "
                                                                  "(default: a random-init ~4M Llama)")
    p.add_argument("--rss-every", type=float, default=2.0, help="seconds between RSS samples (default: 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--machine", default=None, help="a name for the machine in the results")
    p.add_argument("--out-name", default="server_soak_cpu")
    args = p.parse_args()
    result = run(args)
    write_results(args, result)
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
