"""Presence, frequency and repetition penalties: greedy outputs equal transformers' `generate` with the same rule
(transformers' own repetition penalty; OpenAI's presence / frequency rule as a logits processor), in a batch beside
unpenalized requests and under speculative verification."""

from __future__ import annotations

import pytest
import torch
from infer_helpers import ScriptedProposer

from glassbox.errors import GlassboxError
from glassbox.inference.engine import EngineConfig, LLMEngine
from glassbox.inference.llm import LLM
from glassbox.inference.sampler import apply_penalties
from glassbox.inference.sampling_params import SamplingParams
from glassbox.inference.sequence import Sequence
from glassbox.inference.speculative import Draft

MAX_NEW = 24


class OpenAIPenalties:
    """OpenAI's rule, written against transformers' LogitsProcessor interface: a token generated c times so far
    loses c x frequency + (c > 0) x presence from its logit. The prompt does not count."""

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        counts = torch.zeros_like(scores)
        generated = input_ids[:, self.prompt_len:]
        counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def _hf_greedy(hf, prompt: list[int], **penalties) -> list[int]:
    from transformers import LogitsProcessorList

    x = torch.tensor([prompt])
    kwargs = {}
    if "repetition_penalty" in penalties:
        kwargs["repetition_penalty"] = penalties["repetition_penalty"]
    else:
        kwargs["logits_processor"] = LogitsProcessorList(
            [OpenAIPenalties(len(prompt), penalties["presence_penalty"], penalties["frequency_penalty"])])
    with torch.no_grad():
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_NEW, do_sample=False, **kwargs)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def setup(llama_dir, prompts):
    from transformers import AutoModelForCausalLM

    llm = LLM(llama_dir)
    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    return llm, hf, [llm.tokenizer.encode(p) for p in prompts[:6]]


@pytest.mark.parametrize("penalties", [
    {"repetition_penalty": 1.6},
    {"repetition_penalty": 0.7},
    {"presence_penalty": 1.5, "frequency_penalty": 0.0},
    {"presence_penalty": 0.0, "frequency_penalty": 2.0},
    {"presence_penalty": -0.5, "frequency_penalty": 1.0},
])
def test_penalized_greedy_matches_transformers(setup, penalties):
    llm, hf, token_prompts = setup
    plain = SamplingParams(temperature=0, max_tokens=MAX_NEW)
    penalized = SamplingParams(temperature=0, max_tokens=MAX_NEW, **penalties)
    # Penalized and plain requests share every batch: the penalty must touch only its own rows.
    outs = llm.generate(token_prompts + token_prompts, [penalized] * len(token_prompts) + [plain] * len(token_prompts))
    got = [o.outputs[0].token_ids for o in outs]
    expected = [_hf_greedy(hf, p, **penalties) for p in token_prompts]
    assert got[:len(token_prompts)] == expected
    assert got[len(token_prompts):] == [o.outputs[0].token_ids for o in llm.generate(token_prompts, plain)]
    assert got[:len(token_prompts)] != got[len(token_prompts):]     # the penalty changed something


def test_penalties_hold_under_speculative_verification(llama_dir, setup):
    llm, hf, token_prompts = setup
    penalties = {"presence_penalty": 0.5, "frequency_penalty": 1.5}
    prompt = token_prompts[2]
    expected = _hf_greedy(hf, prompt, **penalties)
    # Drafts are the penalized continuation with every third token wrong: each verified row must count the draft
    # tokens before it, or accepted drafts would drift from the penalized greedy path.
    proposer = ScriptedProposer(len(prompt), expected)
    engine = LLMEngine.from_model_dir(llama_dir, EngineConfig(num_spec_tokens=4), proposer=proposer)
    out = LLM(engine=engine).generate(
        [prompt], SamplingParams(temperature=0, max_tokens=MAX_NEW, **penalties))[0]
    assert out.outputs[0].token_ids == expected
    assert proposer.calls > 0 and engine.num_steps < MAX_NEW


def test_each_draft_row_counts_the_draft_tokens_before_it():
    seq = Sequence("a", [1, 2], SamplingParams(presence_penalty=0.5, frequency_penalty=1.0))
    seq.token_ids += [3, 3]                              # generated so far
    rep = Sequence("b", [1], SamplingParams(repetition_penalty=2.0))
    rep.token_ids += [2]
    plain = Sequence("c", [3, 4], SamplingParams())
    signs = torch.tensor([1.0, -1.0] * 4)                # logit +1 at even token ids, -1 at odd ones
    logits = signs.repeat(6, 1)
    # Two draft tokens for seq: three rows to verify.
    out = apply_penalties(logits, [(seq, Draft.linear([4, 3])), (rep, Draft.linear([5])), (plain, Draft())])
    expected = logits.clone()
    expected[0, 3] -= 2 * 1.0 + 0.5                      # 3 twice
    expected[1, 3] -= 2 * 1.0 + 0.5
    expected[1, 4] -= 1 * 1.0 + 0.5                      # + draft token 4
    expected[2, 3] -= 3 * 1.0 + 0.5                      # + draft token 3
    expected[2, 4] -= 1 * 1.0 + 0.5
    expected[3, 1], expected[3, 2] = -2.0, 0.5           # prompt 1 and output 2: negative x2, positive /2
    expected[4, 1], expected[4, 2], expected[4, 5] = -2.0, 0.5, -2.0   # + draft token 5
    assert torch.equal(out, expected)
    assert torch.equal(logits, signs.repeat(6, 1))       # the caller's logits are left alone


@pytest.mark.parametrize("kwargs", [{"presence_penalty": 2.5}, {"frequency_penalty": -3}, {"repetition_penalty": 0}])
def test_out_of_range_penalties_are_refused(kwargs):
    with pytest.raises(GlassboxError, match="penalty"):
        SamplingParams(**kwargs)
