"""`glassbox data prepare`: corpora -> tokenizer -> megatron-core token store + meta.json with a fingerprint.

Steps: read every source in a fixed order (hashing its bytes), train a byte-level BPE (or reuse a given
tokenizer.json), assign each document to train or valid by a hash of its text, tokenize in parallel
(`encode_batch`, one end-of-text token after each document) into `train.bin/.idx` and `valid.bin/.idx`, and write
meta.json. Everything is built in a staging folder that replaces DATA_DIR only when complete, so DATA_DIR is never
half-written. Same inputs give byte-identical files and the same fingerprint; when meta.json already records the
same inputs, the run is a no-op.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from glassbox.atomic import sha256_file, staged_dir, write_bytes, write_json
from glassbox.data.sources import read_source
from glassbox.data.store import (
    CHUNK_BYTES,
    META_FORMAT,
    SPLITS,
    TokenStore,
    canonical_sha256,
    megatron_datasets,
    token_dtype,
)
from glassbox.data.tokenizer import check_vocab_size, eot_token, load_tokenizer, train_bpe
from glassbox.errors import GlassboxError
from glassbox.file_table import hash_file

DEFAULT_VALID_FRACTION = 0.02
# Characters of text handed to one encode_batch call: big enough to keep every core busy, small enough to
# advance the progress bar often.
_ENCODE_CHUNK_CHARS = 1 << 20


@dataclass
class PrepareResult:
    out: Path
    meta: dict
    skipped: bool                      # True when DATA_DIR already held exactly these inputs
    seconds: float
    warnings: list[str] = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]


def in_valid_split(text: str, valid_fraction: float) -> bool:
    """A document's split depends only on its text, so it never moves when other documents are added."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < valid_fraction


def _valid_documents(docs: list[str], valid_fraction: float) -> set[int]:
    """Ids of the documents held out, chosen by `in_valid_split`.

    A small corpus may draw no valid document at all; then the one whose length is closest to `valid_fraction`
    of the corpus is held out, so both splits are non-empty whenever there are two documents.
    """
    valid = [i for i, d in enumerate(docs) if in_valid_split(d, valid_fraction)]
    if valid_fraction > 0 and not valid and len(docs) >= 2:
        target = valid_fraction * sum(map(len, docs))
        valid = [min(range(len(docs)), key=lambda i: (abs(len(docs[i]) - target), i))]
    if len(valid) == len(docs) and len(docs) >= 2:
        valid = valid[1:]
    return set(valid)


def _chunks(docs: list[str]):
    """[start, end) ranges of about _ENCODE_CHUNK_CHARS characters each, with their character counts."""
    start = 0
    while start < len(docs):
        end, size = start, 0
        while end < len(docs) and (size < _ENCODE_CHUNK_CHARS or end == start):
            size += len(docs[end])
            end += 1
        yield start, end, size
        start = end


def _tokenize_into_store(
    tok, docs: list[str], split_of: list[str], eod_id: int, dtype: np.dtype, out: Path, progress: bool
) -> tuple[dict, list[int]]:
    """Encode documents in parallel batches (with a progress bar), end-of-text after each, straight into the
    megatron IndexedDataset of each document's split. Returns per-split counts and per-document token counts."""
    from tqdm import tqdm

    builder_cls = megatron_datasets().indexed_dataset.IndexedDatasetBuilder
    builders = {split: builder_cls(str(out / f"{split}.bin"), dtype=dtype.type) for split in SPLITS}
    counts = {split: {"documents": 0, "tokens": 0} for split in SPLITS}
    doc_tokens: list[int] = []
    with tqdm(total=sum(map(len, docs)), unit="char", unit_scale=True, desc="tokenize", disable=not progress) as bar:
        for start, end, size in _chunks(docs):
            for i, enc in enumerate(tok.encode_batch(docs[start:end], add_special_tokens=False), start):
                ids = np.asarray(enc.ids + [eod_id], dtype=dtype)
                builders[split_of[i]].add_document(ids, lengths=[len(ids)])
                counts[split_of[i]]["documents"] += 1
                counts[split_of[i]]["tokens"] += len(ids)
                doc_tokens.append(len(ids))
            bar.update(size)
    for split, builder in builders.items():
        builder.finalize(str(out / f"{split}.idx"))
    return counts, doc_tokens


def _existing_meta(out: Path) -> dict | None:
    """meta.json of a complete prepared DATA_DIR at `out`, None if there is none; refuses to replace other folders."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise GlassboxError(f"--out {out}: exists and is not a directory")
    if not (out / "meta.json").is_file():
        if any(out.iterdir()):
            raise GlassboxError(f"--out {out}: exists, is not empty and holds no meta.json; refusing to replace it")
        return None
    try:
        return TokenStore(out).meta
    except GlassboxError:
        return None


def prepare(
    sources: list[str],
    out: Path,
    vocab_size: int = 4096,
    tokenizer: Path | None = None,
    *,
    valid_fraction: float = DEFAULT_VALID_FRACTION,
    max_bytes: int | None = None,
    progress: bool = True,
) -> PrepareResult:
    """Build (or confirm) a token store in `out` from `sources`; see the module docstring."""
    t0 = time.perf_counter()
    out = Path(out)
    if not sources:
        raise GlassboxError("no --source given")
    if tokenizer is None:
        check_vocab_size(vocab_size)
    if not 0.0 <= valid_fraction < 1.0:
        raise GlassboxError(f"--valid-fraction {valid_fraction}: must be in [0, 1)")
    if max_bytes is not None and max_bytes <= 0:
        raise GlassboxError(f"--max-bytes {max_bytes}: must be positive")

    read = [read_source(spec, max_bytes) for spec in sources]
    given_tok_bytes = None
    if tokenizer is not None:
        tokenizer = Path(tokenizer)
        if not tokenizer.is_file():
            raise GlassboxError(f"--tokenizer {tokenizer}: no such file")
        given_tok_bytes = tokenizer.read_bytes()
    settings = {
        "vocab_size": None if tokenizer is not None else vocab_size,
        "valid_fraction": valid_fraction,
        "max_bytes": max_bytes,
        "tokenizer": hashlib.sha256(given_tok_bytes).hexdigest() if given_tok_bytes is not None else "train-bpe",
    }
    inputs_sha = canonical_sha256({"sources": [s.summary() for s in read], "settings": settings})
    warnings = [
        f"source {s.spec!r}: {s.replaced_bytes} undecodable bytes replaced with U+FFFD"
        for s in read
        if s.replaced_bytes
    ]

    existing = _existing_meta(out)
    if existing is not None and existing.get("inputs_sha256") == inputs_sha:
        return PrepareResult(out, existing, True, time.perf_counter() - t0, warnings)

    docs: list[str] = [d for s in read for d in s.documents]
    owner = [i for i, s in enumerate(read) for _ in s.documents]
    with staged_dir(out, replace=True) as tmp:
        if given_tok_bytes is not None:
            write_bytes(tmp / "tokenizer.json", given_tok_bytes)
            tok = load_tokenizer(tmp / "tokenizer.json")
            eot_name, eod_id = eot_token(tok, str(tokenizer))
        else:
            tok = train_bpe(docs, len(docs), vocab_size, progress)
            write_bytes(tmp / "tokenizer.json", tok.to_str(pretty=True).encode())
            eot_name, eod_id = eot_token(tok, "trained")
        actual_vocab = tok.get_vocab_size(with_added_tokens=True)
        dtype = token_dtype(actual_vocab)

        valid = _valid_documents(docs, valid_fraction)
        split_of = ["valid" if i in valid else "train" for i in range(len(docs))]
        splits, doc_tokens = _tokenize_into_store(tok, docs, split_of, eod_id, dtype, tmp, progress)
        source_tokens = [0] * len(read)
        for n, src in zip(doc_tokens, owner):
            source_tokens[src] += n

        files = {name: sha256_file(tmp / name) for name in ["tokenizer.json"] + [f"{s}.idx" for s in SPLITS]}
        chunks = {}
        for split in SPLITS:
            name = f"{split}.bin"
            size = (tmp / name).stat().st_size
            ranges = [(o, min(CHUNK_BYTES, size - o)) for o in range(0, size, CHUNK_BYTES)]
            files[name], chunks[name] = hash_file(tmp / name, ranges)     # one read for both
        meta = {
            "format": META_FORMAT,
            "sources": [dict(s.summary(), tokens=n) for s, n in zip(read, source_tokens)],
            "settings": settings,
            "tokenizer": {"sha256": files["tokenizer.json"], "eot": eot_name, "trained": given_tok_bytes is None},
            "vocab_size": actual_vocab,
            "eod_id": eod_id,
            "dtype": dtype.name,
            "splits": splits,
            "files": files,
            "chunk_bytes": CHUNK_BYTES,
            "chunks": chunks,
            "inputs_sha256": inputs_sha,
        }
        meta["fingerprint"] = canonical_sha256(meta)
        write_json(tmp / "meta.json", meta)
    return PrepareResult(out, meta, False, time.perf_counter() - t0, warnings)


def _count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def prepare_cli_summary(result: PrepareResult) -> str:
    """A short human-readable report of what `prepare` built (or found already built)."""
    meta = result.meta
    if result.skipped:
        state = "unchanged: meta.json already records these inputs"
    else:
        state = f"built in {result.seconds:.1f} s"
    lines = [f"data dir     {result.out} ({state})"]
    for s in meta["sources"]:
        cut = ", cut at --max-bytes" if s["truncated"] else ""
        lines.append(
            f"source       {s['spec']}: {s['files']} files, {s['documents']} documents, "
            f"{_count(s['bytes'])}B, {_count(s['tokens'])} tokens{cut}"
        )
    tok = meta["tokenizer"]
    origin = "trained byte-level BPE" if tok["trained"] else "given tokenizer.json"
    lines.append(f"tokenizer    {origin}, vocab {meta['vocab_size']}, end-of-text {tok['eot']} = id {meta['eod_id']}")
    lines.append(
        "splits       "
        + ", ".join(f"{k} {v['documents']} docs / {_count(v['tokens'])} tokens" for k, v in meta["splits"].items())
    )
    lines.append(f"fingerprint  {meta['fingerprint']}")
    lines += [f"warning: {w}" for w in result.warnings]
    return "\n".join(lines)
