"""The reasoning model's data: worked solutions the task's own scorer accepts, held-out seeds and templates, and
the fine-tune config run for real (two steps from a tiny pretrained directory), exported and served with Dynasor."""

from __future__ import annotations

from pathlib import Path

import pytest

from glassbox.cli import main
from glassbox.inference.dynasor.answers import extract_boxed
from glassbox.inference.dynasor.tasks import (EVAL_TEMPLATES, TASKS, TRAIN_TEMPLATES, chain_sum_steps,
                                              eval_problems, products_steps, training_documents, worked_solution)

ROOT = Path(__file__).resolve().parents[2]


def test_steps_hand_computed():
    assert chain_sum_steps("55 - 98 + 93") == (["55 - 98 = -43", "-43 + 93 = 50"], 50)
    assert products_steps("98 * 93") == (["98 * 93 = 98 * 90 + 98 * 3", "= 8820 + 294 = 9114"], 9114)
    assert products_steps("7 * 8") == (["7 * 8 = 56"], 56)
    assert products_steps("12 * 40") == (["12 * 40 = 480"], 480)


def test_worked_solutions_box_the_answer_the_scorer_accepts():
    for problem in eval_problems(24):
        solution = worked_solution(TASKS[problem.task], problem.entry["metadata"]["expression"])
        assert problem.correct(extract_boxed(solution)), (problem.prompt, solution)
        assert "Let me check it again" in solution


def test_evaluation_is_held_out_by_seed_and_template():
    problems = eval_problems(64)
    assert {p.task for p in problems} == set(TASKS)
    assert all(any(p.prompt.startswith(t.split("{q}")[0]) for t in EVAL_TEMPLATES) for p in problems)
    docs = training_documents(200, held_out=64)
    assert len(docs) == 200
    questions = {p.entry["question"] for p in problems}
    assert not any(q in d for q in questions for d in docs)
    assert all(any(d.startswith(t.split("{q}")[0]) for t in TRAIN_TEMPLATES) for d in docs)
    assert not any(d.startswith(t.split("{q}")[0]) for t in EVAL_TEMPLATES for d in docs)


def test_the_fine_tune_config_runs_exports_and_serves_programs(llama_dir, tmp_path):
    """The config as the GPU run uses it, shrunk by flags: data prepared with the base directory's tokenizer,
    two real optimizer steps from its weights, the export, and a Dynasor program on the result."""
    from glassbox.inference.dynasor.controller import run_programs
    from glassbox.inference.dynasor.programs import ChainOfThought, SelfConsistency
    from glassbox.inference.dynasor.tasks import write_training_data
    from glassbox.inference.engine import EngineConfig, LLMEngine

    write_training_data(tmp_path / "data", llama_dir / "tokenizer.json", 64, valid_fraction=0.1)
    assert main(["train", "--config", str(ROOT / "configs" / "dynasor-sft.yaml"), "--set", f"init_from={llama_dir}",
                 "--data", str(tmp_path / "data"), "--run-dir", str(tmp_path / "sft"), "--steps", "2",
                 "--set", "model.max_seq_len=160", "--set", "data.seq_len=128",
                 "--set", "batch.global_batch_size=4", "--set", "batch.micro_batch_size=4",
                 "--set", "checkpoint.every=2", "--set", "logging.val_every=2", "--set", "logging.val_samples=4",
                 "--set", "schedule.warmup_steps=1"]) == 0
    assert main(["export", "--checkpoint", str(tmp_path / "sft"), "--out", str(tmp_path / "model")]) == 0
    engine = LLMEngine.from_model_dir(tmp_path / "model", EngineConfig(policy="dynasor", num_kv_blocks=128,
                                                                     block_size=8))
    ids = engine.tokenizer.encode(eval_problems(1)[0].prompt)
    sc, cot = run_programs(engine, [SelfConsistency(ids, max_samples=3, max_tokens=24, seed=1),
                                    ChainOfThought(ids, max_tokens=40, probe_interval=8)])
    assert sc.num_samples >= 2 and sc.output_tokens > 0
    assert cot.num_probes >= 1 and cot.probe_tokens > 0
    assert engine.blocks.num_used_blocks == 0


@pytest.mark.parametrize("count", [0, -1])
def test_training_documents_refuse_a_bad_count(count):
    from glassbox.errors import GlassboxError

    with pytest.raises(GlassboxError, match="count"):
        training_documents(count)
