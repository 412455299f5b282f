"""The reasoning tasks Dynasor's model is trained and measured on: reasoning-gym's seeded generators, each with
an exact scorer, written out as worked solutions that close in the probe cue's format (`PROBE_CUE`).

A worked solution computes the answer once, states it, then checks it twice more by other routes (another order
of the terms, another split of the factors) before the final box, as reasoning models do. The checks never change
the answer, which is what probes exploit: a probe after the first pass already answers right, so the checks'
tokens can be saved. The first pass is about a quarter of a solution of 180 to 430 SmolLM2 tokens (median about
340), so a probe every 16 to 32 tokens (each about 8 tokens: a 4-token cue, the answer, its brace) can stop a
generation with most of it unwritten; on the earlier solutions of about 90 tokens the probes cost more than they
saved.

Splits are held out two ways: the evaluation split draws from other seeds than any training shard, and its
prompts use a template no training prompt uses; training questions that also occur in the evaluation split are
dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from glassbox.atomic import write_text
from glassbox.errors import GlassboxError
from glassbox.inference.dynasor.answers import BOXED, TaskComparer

TRAIN_TEMPLATES = ("Question: {q}\nAnswer:", "Problem: {q}\nSolution:", "Task: {q}\nWorking:")
EVAL_TEMPLATES = ("Exercise: {q}\nAnswer:",)
# Dataset seeds: training shards count up from TRAIN_SEED, the evaluation split has its own.
TRAIN_SEED = 1000
EVAL_SEED = 7
# The model closes with " \boxed{N}", so a probe asks with the same 4 SmolLM2 tokens (the reference's "... **Final
# Answer** \boxed{" is 9: most of the 12.7 tokens a probe cost on the H200).
PROBE_CUE = " " + BOXED


@dataclass(frozen=True)
class Pass:
    """One route through the computation: how it goes (`how`, a phrase), its steps, and the value they reach."""

    how: str
    steps: list[str]
    value: int


def _signed_terms(expression: str) -> list[int]:
    """ "55 - 98 + 93" -> [55, -98, 93]."""
    parts = expression.split()
    terms = [int(parts[0])]
    for op, n in zip(parts[1::2], parts[2::2]):
        terms.append(int(n) if op == "+" else -int(n))
    return terms


def _accumulate(terms: list[int]) -> tuple[list[str], int]:
    """Signed terms added one at a time: [55, -98, 93] -> "55 - 98 = -43", "-43 + 93 = 50"."""
    value, steps = terms[0], []
    for n in terms[1:]:
        new = value + n
        steps.append(f"{value} {'+' if n >= 0 else '-'} {abs(n)} = {new}")
        value = new
    return steps, value


def chain_sum_steps(expression: str) -> tuple[list[str], int]:
    """Left to right: "55 - 98 = -43", "-43 + 93 = 50", ..."""
    return _accumulate(_signed_terms(expression))


def chain_sum_passes(expression: str) -> list[Pass]:
    """Left to right; then right to left; then the positive and the negative terms apart."""
    terms = _signed_terms(expression)
    steps, value = chain_sum_steps(expression)
    back, _ = _accumulate(terms[::-1])
    return [Pass("from the first term to the last", steps, value),
            Pass("from the last term back to the first", back, value),
            Pass("with the positive and the negative terms apart", _by_sign(terms), value)]


def _by_sign(terms: list[int]) -> list[str]:
    """The positive terms' sum, the negative terms' sum, their difference (all three as steps)."""
    plus, minus = [t for t in terms if t >= 0], [-t for t in terms if t < 0]
    plus_steps, plus_sum = _accumulate(plus) if plus else ([], 0)
    if not minus:
        return [*plus_steps, f"every term is added, so the total is {plus_sum}"]
    minus_steps, minus_sum = _accumulate(minus)
    return [*plus_steps, f"the positive terms make {plus_sum}", *minus_steps,
            f"the negative terms make {minus_sum}", f"{plus_sum} - {minus_sum} = {plus_sum - minus_sum}"]


def _place_parts(n: int) -> list[int]:
    """The place values of `n`'s nonzero digits, signed: 93 -> [90, 3], -40 -> [-40]; 0 -> [0]."""
    digits, sign = str(abs(n)), -1 if n < 0 else 1
    return [sign * int(d) * 10 ** (len(digits) - 1 - i) for i, d in enumerate(digits) if d != "0"] or [0]


def _times(value: int, n: int, split_first: bool) -> list[str]:
    """`value * n` by the place values of one factor, `n` or `value`: "98 * 93 = 98 * 90 + 98 * 3 = 8820 + 294 =
    9114"; more than two partial products are then added one at a time, as steps of their own."""
    pairs = [(a, n) for a in _place_parts(value)] if split_first else [(value, b) for b in _place_parts(n)]
    if len(pairs) == 1:
        return [f"{value} * {n} = {value * n}"]
    partials = [a * b for a, b in pairs]
    split = f"{value} * {n} = " + " + ".join(f"{a} * {b}" for a, b in pairs) + " = " + " + ".join(map(str, partials))
    if len(partials) == 2:
        return [f"{split} = {value * n}"]
    return [split, *_accumulate(partials)[0]]


def _product(factors: list[int], split_first: bool) -> tuple[list[str], int]:
    value, steps = factors[0], []
    for n in factors[1:]:
        steps += _times(value, n, split_first)
        value *= n
    return steps, value


def products_steps(expression: str) -> tuple[list[str], int]:
    """By place value of each next factor: "98 * 93 = 98 * 90 + 98 * 3 = 8820 + 294 = 9114"."""
    return _product([int(p) for p in expression.split()[0::2]], split_first=False)


def products_passes(expression: str) -> list[Pass]:
    """Splitting each next factor by place value; the factors in reverse order; splitting the product so far."""
    factors = [int(p) for p in expression.split()[0::2]]
    steps, value = products_steps(expression)
    return [Pass("splitting each next factor by place value", steps, value),
            Pass("with the factors in reverse order", _product(factors[::-1], split_first=False)[0], value),
            Pass("splitting the product so far by place value", _product(factors, split_first=True)[0], value)]


@dataclass(frozen=True)
class Task:
    """A reasoning-gym dataset, its generator options, and the routes of its worked solutions (the first
    computes the answer, the others check it)."""

    name: str
    options: dict[str, Any]
    passes: Callable[[str], list[Pass]]


# Long enough chains that the checks are most of a solution (tests/inference/test_dynasor_tasks.py holds the
# lengths): 5 to 8 terms; three two-digit factors.
TASKS = {
    "chain_sum": Task("chain_sum", dict(min_terms=5, max_terms=8, min_digits=1, max_digits=2), chain_sum_passes),
    "products": Task("products", dict(min_terms=3, max_terms=3, min_digits=2, max_digits=2), products_passes),
}


@dataclass
class Problem:
    """One question: the prompt shown to the model, the dataset entry (its scorer's input) and the dataset."""

    prompt: str
    entry: dict[str, Any]
    dataset: Any
    task: str

    @property
    def answer(self) -> str:
        return self.entry["answer"]

    def comparer(self) -> TaskComparer:
        return TaskComparer(self.dataset, self.entry)

    def correct(self, answer: str | None) -> bool:
        return self.comparer().correct(answer)


def worked_solution(task: Task, expression: str) -> str:
    """The training target: the first pass, the answer stated, the checks, the final box in the probe's format."""
    first, *checks = task.passes(expression)
    value = first.value
    text = f" {first.how[0].upper()}{first.how[1:]}: {'. '.join(first.steps)}. So the answer is {value}."
    for i, check in enumerate(checks):
        opening = "Let me check it again" if i == 0 else "And once more"
        text += f" {opening}, {check.how}: {', '.join(check.steps)}."
    return f"{text} Yes, it is {value}.{PROBE_CUE}{value}}}"


def _dataset(task: Task, size: int, seed: int):
    import reasoning_gym

    return reasoning_gym.create_dataset(task.name, size=size, seed=seed, **task.options)


def eval_problems(count: int, tasks: tuple[str, ...] = tuple(TASKS)) -> list[Problem]:
    """The held-out split: `count` problems spread over `tasks`, from the evaluation seed, in held-out templates."""
    problems = []
    per_task = -(-count // len(tasks))
    for t, name in enumerate(tasks):
        task = TASKS[name]
        ds = _dataset(task, per_task, EVAL_SEED + t)
        for i, entry in enumerate(ds):
            template = EVAL_TEMPLATES[i % len(EVAL_TEMPLATES)]
            problems.append(Problem(template.format(q=entry["question"]), entry, ds, name))
    order = sorted(range(len(problems)), key=lambda i: (i % per_task, i // per_task))   # interleave the tasks
    return [problems[i] for i in order][:count]


def training_documents(count: int, held_out: int = 512, tasks: tuple[str, ...] = tuple(TASKS)) -> list[str]:
    """`count` training documents (prompt + worked solution), none asking a question of the first `held_out`
    evaluation problems."""
    if count < 1:
        raise GlassboxError(f"training documents: count must be >= 1, got {count}")
    banned = {p.entry["question"] for p in eval_problems(held_out, tasks)}
    docs: list[str] = []
    per_task = -(-count // len(tasks))
    for t, name in enumerate(tasks):
        task = TASKS[name]
        ds = _dataset(task, per_task + len(banned), TRAIN_SEED + t)
        kept = 0
        for i, entry in enumerate(ds):
            if kept == per_task:
                break
            if entry["question"] in banned:
                continue
            prompt = TRAIN_TEMPLATES[i % len(TRAIN_TEMPLATES)].format(q=entry["question"])
            docs.append(prompt + worked_solution(task, entry["metadata"]["expression"]))
            kept += 1
    return docs[:count]


def write_training_data(out: Path, tokenizer_json: Path, count: int, valid_fraction: float = 0.02,
                        progress: bool = False) -> Path:
    """Write the training documents as JSONL beside DATA_DIR `out` and prepare them into `out` with the base
    model's tokenizer (the fine-tune's init_from checks it is the same file)."""
    from glassbox.data.prepare import prepare

    out = Path(out)
    docs = training_documents(count)
    jsonl = out.with_name(out.name + ".jsonl")
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    write_text(jsonl, "".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare([str(jsonl)], out, tokenizer=Path(tokenizer_json), valid_fraction=valid_fraction, progress=progress)
    return jsonl
