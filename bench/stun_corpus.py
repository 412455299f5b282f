"""The arithmetic task data of bench/stun.py: reasoning-gym problems, as training documents and as a held-out set.

A model trained only on code scores zero on any reasoning task, pruned or not; mixing these problems into the
training corpus gives the pruned models a task whose accuracy can fall. reasoning-gym generates them
(`basic_arithmetic`, 2-3 terms of 1-2 digits) from a seed, and the files are kept in bench/traces/ so the GPU
machine, which may lack reasoning-gym, trains and scores on exactly the same problems:

    python bench/stun_corpus.py        # writes bench/traces/stun_arith_{train.parquet,eval.jsonl.gz}

Training documents are `"<question> Answer: <answer>\n"`, one problem per document; the eval set (another seed,
with its entries' metadata for reasoning-gym's scorer) never appears in training.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

TRACES = Path(__file__).resolve().parent / "traces"
TRAIN = TRACES / "stun_arith_train.parquet"
EVAL = TRACES / "stun_arith_eval.jsonl.gz"
TASK = "basic_arithmetic"
TASK_ARGS = {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}
TRAIN_ITEMS, EVAL_ITEMS = 120_000, 500
TRAIN_SEED, EVAL_SEED = 1, 2


def document(question: str, answer: str) -> str:
    return f"{question} Answer: {answer}\n"


def prompt(question: str) -> str:
    return f"{question} Answer:"


def main() -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import reasoning_gym

    train = reasoning_gym.create_dataset(TASK, size=TRAIN_ITEMS, seed=TRAIN_SEED, **TASK_ARGS)
    held_out = reasoning_gym.create_dataset(TASK, size=EVAL_ITEMS, seed=EVAL_SEED, **TASK_ARGS)
    eval_questions = {e["question"] for e in held_out}
    texts = [document(e["question"], e["answer"]) for e in train if e["question"] not in eval_questions]
    TRACES.mkdir(exist_ok=True)
    pq.write_table(pa.table({"text": texts}), TRAIN, compression="zstd")
    with gzip.open(EVAL, "wt") as f:
        for e in held_out:
            f.write(json.dumps({"question": e["question"], "answer": e["answer"], "metadata": e["metadata"]},
                               sort_keys=True) + "\n")
    print(f"{len(texts)} training problems -> {TRAIN}; {EVAL_ITEMS} held out -> {EVAL}")


if __name__ == "__main__":
    main()
