"""Offline generation: `LLM(model_dir).generate(prompts, SamplingParams(...))` runs a batch to completion;
`LLM.run_programs` runs Dynasor reasoning programs (self-consistency, chain of thought with probes) the same way."""

from __future__ import annotations

import itertools
from pathlib import Path

from tqdm import tqdm

from glassbox.errors import GlassboxError
from glassbox.inference.engine import EngineConfig, LLMEngine, RequestOutput
from glassbox.inference.sampling_params import SamplingParams


class LLM:
    def __init__(self, model_dir: str | Path | None = None, *, engine: LLMEngine | None = None, **config):
        if engine is None:
            if model_dir is None:
                raise GlassboxError("LLM needs a model directory or an engine")
            engine = LLMEngine.from_model_dir(model_dir, EngineConfig(**config))
        self.engine = engine
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Outputs in prompt order. Prompts are strings (tokenised here) or lists of token ids. A request the engine
        fails (an exception while sampling it) comes back finished, with finish_reason "error" and the exception in
        its `error`; the others are unaffected."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise GlassboxError(f"{len(plist)} sampling params for {len(prompts)} prompts")
        order = []
        for prompt, p in zip(prompts, plist):
            if isinstance(prompt, str):
                if self.tokenizer is None:
                    raise GlassboxError("text prompts need a tokenizer.json in the model directory")
                prompt = self.tokenizer.encode(prompt)
            rid = f"offline-{next(self._ids)}"
            self.engine.add_request(rid, prompt, p)
            order.append(rid)
        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(order), desc="generate", unit="req", disable=not use_tqdm) as bar:
            while len(done) < len(order):
                for out in self.engine.step(unfinished_outputs=False):
                    done[out.request_id] = out
                    bar.update(1)
        return [done[rid] for rid in order]

    def run_programs(self, programs: list) -> list:
        """Run reasoning programs (glassbox.inference.dynasor.programs: SelfConsistency, ChainOfThought) to the end;
        their ProgramResults in order."""
        from glassbox.inference.dynasor.controller import run_programs

        return run_programs(self.engine, programs)
