"""A tiny model that has learnt a handful of reasoning scripts, so Dynasor's programs run on real generations.

Trained here in a few seconds (a real Adam loop on the glassbox Transformer) to continue each prompt with its
script, and, after any probe point of a script followed by the answer cue, with that script's probe answer:
- "sure": reasons, then boxes 42; its probes answer 42 (they agree: a chain of thought stops early);
- "noans": reasons and never boxes anything (self-consistency never becomes certain);
- "alt": its probes answer 1, 2, 1, ... (they never agree), its generation boxes 7;
- "hedge": its probes answer "hmm 42" (a hedging word: never settled), its generation boxes 42.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from conftest import EOS
from infer_helpers import one_thread

from glassbox.inference.dynasor.answers import ANSWER_CUE
from glassbox.inference.engine import EngineConfig, LLMEngine
from glassbox.inference.tokenizer import Tokenizer
from glassbox.models.transformer import ModelConfig, Transformer

PROBE_INTERVAL = 8
PROBE_POINTS = (8, 16, 24, 32, 40)     # every probe a 48-token script meets
PROMPTS = {"sure": "Q: sure?\n", "noans": "Q: noans?\n", "alt": "Q: alt?\n", "hedge": "Q: hedge?\n"}
REASONING = {
    "sure": "Twenty and twenty make forty, two more make forty two. \\boxed{42}",
    "noans": "Counting the items slowly gives a number we note down. Done.",
    "alt": "The first half gives seven, the second half adds none. \\boxed{7}",
    "hedge": "Adding twenty, twenty and two, we reach forty two. \\boxed{42}",
}
# The scripts whose probe points are trained (a script without them just generates).
PROBED = ("sure", "alt", "hedge")


def probe_reply(name: str, point: int) -> str:
    if name == "alt":
        return f" {1 + PROBE_POINTS.index(point) % 2}}}"
    if name == "hedge":
        return " hmm 42}"
    return " 42}"


def training_sequences(tok: Tokenizer, eos: int) -> list[tuple[list[int], int]]:
    """(tokens, where the learnt part starts): a script after its prompt; a probe's reply after its cue (the
    context before the cue is the script's own, which the probe example must not teach to end in a cue)."""
    cue = tok.encode(ANSWER_CUE)
    seqs = []
    for name, prompt in PROMPTS.items():
        p, r = tok.encode(prompt), tok.encode(REASONING[name])
        seqs.append((p + r + [eos], len(p)))
        for k in PROBE_POINTS if name in PROBED else ():
            if k < len(r):
                seqs.append((p + r[:k] + cue + tok.encode(probe_reply(name, k)), len(p) + k + len(cue)))
    return seqs


def train_scripted_model(model_dir: Path, steps: int = 400, seed: int = 0) -> Transformer:
    """Fit the scripts (full-batch Adam); `model_dir` holds the tokenizer."""
    with one_thread():
        return _train(Tokenizer(model_dir), steps, seed)


def _train(tok: Tokenizer, steps: int, seed: int) -> Transformer:
    eos = tok.eos_token_id
    seqs = training_sequences(tok, eos)
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_seq_len=256, init_std=0.05)
    model = Transformer(cfg)
    width = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), width), eos)
    learn = torch.zeros(len(seqs), width - 1, dtype=torch.bool)      # position t predicts token t + 1
    for i, (s, start) in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        learn[i, start - 1:len(s) - 1] = True
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits[learn], ids[:, 1:][learn])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@functools.cache
def scripted_model(tokenizer_json: Path) -> tuple[Transformer, Path]:
    """The scripted model and a model directory with the tests' tokenizer, trained once per test process (every
    Dynasor test module shares it)."""
    model_dir = Path(tempfile.mkdtemp(prefix="dynasor-scripted-"))
    (model_dir / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}))
    return train_scripted_model(model_dir), model_dir


def scripted_engine(model: Transformer, model_dir: Path, **config) -> LLMEngine:
    tok = Tokenizer(model_dir)
    cfg = dict(block_size=8, num_kv_blocks=256, max_num_seqs=16, policy="dynasor")
    cfg.update(config)
    return LLMEngine(model, tok, EngineConfig(**cfg), [tok.eos_token_id])
