"""Final answers: pulling one out of generated text, and deciding whether two answers are the same.

Programs compare answers with the task's own rule where one exists (a reasoning-gym dataset's `score_answer`, which
knows that "0.50" and "1/2" may both be right for one task and not for another); otherwise with `MathComparer`,
which normalises spacing, LaTeX wrappers and number formats and compares numbers by value.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any, Protocol

# The cue a probe appends and the format the reasoning model is trained to close with: the answer is what follows
# it up to the matching brace.
BOXED = "\\boxed{"
ANSWER_CUE = "... **Final Answer** \\boxed{"


def extract_boxed(text: str) -> str | None:
    """The content of the last complete `\\boxed{...}` in `text` (nested braces matched), or None."""
    start = text.rfind(BOXED)
    while start >= 0:
        content = _until_closing_brace(text[start + len(BOXED):])
        if content is not None:
            return content.strip()
        start = text.rfind(BOXED, 0, start)
    return None


def _until_closing_brace(text: str) -> str | None:
    depth = 0
    for i, ch in enumerate(text):
        if ch == "{":
            depth += 1
        elif ch == "}":
            if depth == 0:
                return text[:i]
            depth -= 1
    return None


def probe_answer(continuation: str) -> str | None:
    """The answer a probe gave: its continuation after the cue (which opened the box) up to the closing brace.
    None when the box never closes (the probe ran out of tokens mid-answer) or closes empty."""
    content = _until_closing_brace(continuation)
    if content is None or not content.strip():
        return None
    return content.strip()


class Comparer(Protocol):
    def equivalent(self, a: str, b: str) -> bool:
        """Whether answers `a` and `b` are the same answer to the task."""
        ...


_LATEX_WRAPPERS = re.compile(r"\\(?:text|mathrm|textbf|mathbf)\{([^{}]*)\}")
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_FRACTION = re.compile(r"^([+-]?\d+)/(\d+)$")
_LATEX_FRAC = re.compile(r"^([+-]?)\\d?frac\{(\d+)\}\{(\d+)\}$")


def normalize(answer: str) -> str:
    """Spacing, dollar signs, LaTeX text wrappers, thousands separators and a trailing period removed."""
    s = _LATEX_WRAPPERS.sub(r"\1", answer.strip())
    s = s.replace("$", "").replace("\\!", "").replace("\\,", "").replace(" ", "")
    s = s.rstrip(".")
    if re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+(\.\d*)?", s):
        s = s.replace(",", "")
    return s


def as_number(answer: str) -> Fraction | None:
    """The exact value of a normalised numeric answer (integer, decimal, a/b, \\frac{a}{b}), or None."""
    if _NUMBER.match(answer):
        try:
            return Fraction(answer)
        except (ValueError, ZeroDivisionError):
            return None
    m = _FRACTION.match(answer)
    if m and int(m.group(2)) != 0:
        return Fraction(int(m.group(1)), int(m.group(2)))
    m = _LATEX_FRAC.match(answer)
    if m and int(m.group(3)) != 0:
        value = Fraction(int(m.group(2)), int(m.group(3)))
        return -value if m.group(1) == "-" else value
    return None


class MathComparer:
    """Equal after `normalize`, or equal in exact value when both are numbers ("1,000" = "1000.0", "1/2" = "0.5")."""

    def equivalent(self, a: str, b: str) -> bool:
        na, nb = normalize(a), normalize(b)
        if na == nb:
            return True
        va, vb = as_number(na), as_number(nb)
        return va is not None and vb is not None and va == vb


class TaskComparer:
    """Equivalence by a reasoning-gym dataset's own scorer: `a` matches `b` when the scorer, told that `b` is the
    right answer to `entry`, gives `a` full marks (and the other way round, as scorers need not be symmetric)."""

    def __init__(self, dataset: Any, entry: dict[str, Any]):
        self.dataset = dataset
        self.entry = entry

    def equivalent(self, a: str, b: str) -> bool:
        return self._full_marks(a, b) and self._full_marks(b, a)

    def _full_marks(self, answer: str, truth: str) -> bool:
        return self.dataset.score_answer(answer, {**self.entry, "answer": truth}) >= 1.0

    def correct(self, answer: str | None) -> bool:
        """Whether `answer` is right for the task's entry, by its scorer."""
        return answer is not None and self.dataset.score_answer(answer, self.entry) >= 1.0
