"""Small deterministic corpora for the data tests."""

from __future__ import annotations

from pathlib import Path


def write_corpus(folder: Path, n_docs: int = 12, words: int = 120) -> Path:
    """A deterministic little corpus of Python-like text files, one document per file."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        lines = [
            f"def function_{i}_{j}(x, y={j}):\n    return x * {i} + y - {j}  # note {i * j}\n"
            for j in range(words // 10)
        ]
        (folder / f"doc_{i:02d}.txt").write_text("".join(lines))
    return folder
