"""Self-consistency at full concurrency: programs submitted together run in the same steps, every step carries about
min(unfinished sequences, max_num_seqs) of them, and the sampler draws every sampled row of a step in one batched
operation instead of one host-side multinomial per row.

The H200 run of 2026-12-02 spent 168 s on 128 programs x 8 samples of at most 192 tokens (~1.2k tokens/s, where
greedy chains of thought of the same engine ran an order of magnitude faster): scheduling was not the cause (these
tests hold it), the per-row draws on the host were (the last test)."""

from __future__ import annotations

import pytest
import torch
from dynasor_helpers import PROMPTS, scripted_engine, scripted_model
from torch.profiler import ProfilerActivity, profile

from glassbox.inference.dynasor.controller import ProgramController
from glassbox.inference.dynasor.programs import SelfConsistency
from glassbox.inference.sampler import Sampler, inverse_cdf
from glassbox.inference.sampling_params import SamplingParams
from glassbox.inference.sequence import Sequence
from glassbox.inference.speculative.draft import EMPTY


@pytest.fixture(scope="module")
def scripted(tokenizer_json):
    return scripted_model(tokenizer_json)


def _run_counting(engine, specs: list[SelfConsistency]) -> tuple[list, list[tuple[int, int]]]:
    """Run `specs` submitted together; per step, the sequences it scheduled and the sequences still waiting."""
    controller = ProgramController.of(engine)
    schedule = engine.scheduler.schedule
    steps: list[tuple[int, int]] = []

    def counted():
        out = schedule()
        steps.append((len(out.scheduled), len(engine.scheduler.waiting)))
        return out

    engine.scheduler.schedule = counted
    ids = [f"p{i}" for i in range(len(specs))]
    for program_id, spec in zip(ids, specs):
        controller.submit(program_id, spec)
    while any(i not in controller.results for i in ids):
        engine.step(unfinished_outputs=False)
    return [controller.results.pop(i) for i in ids], steps


def _spec(engine, seed: int, samples: int = 4) -> SelfConsistency:
    return SelfConsistency(engine.tokenizer.encode(PROMPTS["noans"]), max_samples=samples, max_tokens=24,
                           temperature=0.7, seed=seed, adaptive=False)


def test_programs_that_fit_together_run_in_the_same_steps(scripted):
    model, model_dir = scripted
    engine = scripted_engine(model, model_dir, max_num_seqs=16)
    results, steps = _run_counting(engine, [_spec(engine, seed) for seed in range(4)])      # 4 x 4 = 16 seqs
    assert [r.num_samples for r in results] == [4] * 4
    assert steps[0] == (16, 0)                       # every program admitted in the first step
    # All 16 run side by side to the end: as many steps as the longest sample, not one program after another.
    assert len(steps) <= 24 + 1
    assert sum(n for n, _ in steps) == sum(r.output_tokens for r in results)
    assert engine.blocks.num_used_blocks == 0


def test_every_step_is_full_while_programs_wait(scripted):
    """12 programs x 4 samples on 16 slots: while a program waits, a step schedules at least 16 - 3 sequences (a
    gang of 4 waits only for 4 free slots), so the run takes about 3 rounds of steps, not 12."""
    model, model_dir = scripted
    engine = scripted_engine(model, model_dir, max_num_seqs=16)
    results, steps = _run_counting(engine, [_spec(engine, seed) for seed in range(12)])
    assert [r.num_samples for r in results] == [4] * 12
    waiting_steps = [n for n, waiting in steps if waiting > 0]
    assert waiting_steps and min(waiting_steps) >= 16 - 3
    longest = 24
    assert len(steps) <= 4 * (longest + 1)
    assert engine.blocks.num_used_blocks == 0


def _aten_calls(fn) -> dict[str, int]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts: dict[str, int] = {}
    for event in prof.events():
        counts[event.name] = counts.get(event.name, 0) + 1
    return counts


def test_sampler_draws_all_sampled_rows_in_one_batched_search():
    """64 seeded rows: one cumulative sum and one search for all of them, no multinomial per row (which cost ~1 ms
    a row on the host at SmolLM2's 49k vocabulary, after copying every row's probabilities off the GPU)."""
    torch.manual_seed(0)
    rows = [(Sequence(str(i), [1], SamplingParams(temperature=0.7, top_p=0.95, seed=i)), EMPTY) for i in range(64)]
    logits = torch.randn(64, 1000)
    sampler = Sampler(seed=0)
    counts = _aten_calls(lambda: sampler.sample(logits, rows))
    assert counts.get("aten::multinomial", 0) == 0
    assert counts.get("aten::searchsorted", 0) == 1 and counts.get("aten::cumsum", 0) == 2   # top-p's and the draw's
    # Seeded rows draw the same tokens in any company: each row's uniform comes from its own generator.
    fresh = [(Sequence(str(i), [1], SamplingParams(temperature=0.7, top_p=0.95, seed=i)), EMPTY) for i in range(64)]
    together = Sampler(seed=1).sample(logits, fresh)
    alone = [Sampler(seed=2).sample(logits[i:i + 1], [row])[0].tokens
             for i, row in enumerate((Sequence(str(i), [1], SamplingParams(temperature=0.7, top_p=0.95, seed=i)),
                                      EMPTY) for i in range(64))]
    assert [v.tokens for v in together] == alone


def test_inverse_cdf_never_returns_a_token_without_mass():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0], [0.2, 0.0, 0.8, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]])
    for u in (0.0, 0.25, 0.5, 0.75, 1.0 - 2.0**-53, 1.0):        # 1.0 itself: the search runs past the last token
        tokens, mass = inverse_cdf(probs, torch.full((3,), u, dtype=torch.float64))
        assert all(probs[r, t] > 0 for r, t in enumerate(tokens.tolist()))
        assert mass.tolist() == pytest.approx([1.0, 1.0, 1.0])
    tokens, _ = inverse_cdf(probs, torch.tensor([0.4, 0.1, 0.3], dtype=torch.float64))
    assert tokens.tolist() == [1, 0, 4]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sampler_draws_256_rows_of_a_49k_vocabulary_on_the_device_in_milliseconds():
    """The H200 case: 256 sampled rows at SmolLM2's vocabulary, each token inside its row's top-p set, and a step's
    sampling in milliseconds (the host multinomials took most of a second)."""
    import time

    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(256, 49152, generator=g)).cuda()
    rows = [(Sequence(str(i), [1], SamplingParams(temperature=0.7, top_p=0.95, seed=i)), EMPTY) for i in range(256)]
    sampler = Sampler(seed=0)
    sampler.sample(logits, rows)                                    # warm-up (kernels, allocator)
    torch.cuda.synchronize()
    t = time.perf_counter()
    tokens = [v.tokens[0] for v in sampler.sample(logits, rows)]
    seconds = time.perf_counter() - t
    probs = Sampler._probs(logits, [seq for seq, _ in rows]).cpu()
    assert all(probs[r, tok] > 0 for r, tok in enumerate(tokens))
    assert seconds < 0.05, f"sampling 256 rows took {1000 * seconds:.1f} ms"
