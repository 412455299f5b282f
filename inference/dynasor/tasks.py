"""The reasoning tasks Dynasor's model is trained and measured on: reasoning-gym's seeded generators, each with
an exact scorer, written out as worked solutions that end in the answer cue's format.

A worked solution computes the answer step by step, states it, then checks it by redoing the work before the
final box, as reasoning models do: the check rarely changes the answer, which is what probes exploit (a probe
after the first pass already answers right, so the check's tokens can be saved).

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
from glassbox.inference.dynasor.answers import TaskComparer

TRAIN_TEMPLATES = ("Question: {q}\nAnswer:", "Problem: {q}\nSolution:", "Task: {q}\nWorking:")
EVAL_TEMPLATES = ("Exercise: {q}\nAnswer:",)
# Dataset seeds: training shards count up from TRAIN_SEED, the evaluation split has its own.
TRAIN_SEED = 1000
EVAL_SEED = 7
FINAL = "**Final Answer** \\boxed{"


def _terms(expression: str) -> tuple[list[int], list[str]]:
    parts = expression.split()
    return [int(p) for p in parts[0::2]], parts[1::2]


def chain_sum_steps(expression: str) -> tuple[list[str], int]:
    """Left to right: "55 - 98 = -43", "-43 + 93 = 50", ..."""
    numbers, ops = _terms(expression)
    value, steps = numbers[0], []
    for op, n in zip(ops, numbers[1:]):
        new = value + n if op == "+" else value - n
        steps.append(f"{value} {op} {n} = {new}")
        value = new
    return steps, value


def products_steps(expression: str) -> tuple[list[str], int]:
    """By place value of the second factor: "98 * 93 = 98 * 90 + 98 * 3", "= 8820 + 294", "= 9114"."""
    numbers, _ = _terms(expression)
    value = numbers[0]
    steps = []
    for n in numbers[1:]:
        digits = str(abs(n))
        parts = [int(d) * 10 ** (len(digits) - 1 - i) for i, d in enumerate(digits) if d != "0"] or [0]
        sign = -1 if n < 0 else 1
        if len(parts) == 1:
            steps.append(f"{value} * {n} = {value * n}")
        else:
            steps.append(f"{value} * {n} = " + " + ".join(f"{value} * {sign * p}" for p in parts))
            steps.append("= " + " + ".join(str(value * sign * p) for p in parts) + f" = {value * n}")
        value *= n
    return steps, value


@dataclass(frozen=True)
class Task:
    name: str
    options: dict[str, Any]
    steps: Callable[[str], tuple[list[str], int]]


TASKS = {
    "chain_sum": Task("chain_sum", dict(min_terms=3, max_terms=5, min_digits=1, max_digits=2), chain_sum_steps),
    "products": Task("products", dict(min_terms=2, max_terms=2, min_digits=1, max_digits=2), products_steps),
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
    """The training target: steps, the answer stated, the check, the final box."""
    steps, value = task.steps(expression)
    first = ". ".join(steps)
    return (f" {first}. So the answer is {value}. Let me check it again: {', '.join(steps)}. "
            f"Yes, it is {value}. {FINAL}{value}}}")


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
