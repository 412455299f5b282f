"""`glassbox ltr collect`: the served model's own output lengths over the prompt mix, the ranker's labels.

The engine generates greedily (so a label is reproducible and the scheduling benches, also greedy, produce the
very same outputs) up to `max_tokens`; an output cut there is labelled `max_tokens` with finish reason "length"
(censored: the ranker only has to know it is among the longest). Each prompt is rendered with the model's chat
template and tokenized by the served tokenizer, and the token ids are stored: the ranker scores exactly the ids
the engine receives. The collection directory is written whole or not at all:

    meta.json       model, tokenizer fingerprint, max_tokens, seed, prompt count, machine, generation time
    lengths.jsonl   per prompt: id, source, text, prompt_ids, output_len, finish_reason
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

from glassbox.atomic import staged_dir, write_json
from glassbox.errors import GlassboxError


@dataclass
class Example:
    id: int
    source: str
    text: str
    prompt_ids: list[int]
    output_len: int
    finish_reason: str


def collect(model_dir: Path, out_dir: Path, num_prompts: int, max_tokens: int, seed: int = 0,
            device: str = "cpu", max_num_seqs: int = 64, dtype: str | None = None,
            prompts: list | None = None) -> dict:
    """Generate over `num_prompts` prompts of the mix (or over `prompts`, a list of Prompt, when given) and write
    the collection to `out_dir`; returns its meta."""
    import torch

    from glassbox.inference.engine import EngineConfig, LLMEngine
    from glassbox.inference.llm import LLM
    from glassbox.inference.ltr.prompts import prompt_mix
    from glassbox.inference.sampling_params import SamplingParams

    if max_tokens < 1:
        raise GlassboxError(f"ltr collect: --max-tokens must be >= 1, got {max_tokens}")
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    engine = LLMEngine.from_model_dir(model_dir, EngineConfig(device=device, dtype=dtype, max_num_seqs=max_num_seqs,
                                                              seed=seed))
    tok = engine.tokenizer
    if tok is None:
        raise GlassboxError(f"ltr collect: {model_dir} has no tokenizer.json; the ranker learns from prompts as text")
    prompts = prompt_mix(num_prompts, seed) if prompts is None else prompts[:num_prompts]
    num_prompts = len(prompts)
    ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p.text}])) for p in prompts]
    limit = engine.max_model_len - max_tokens
    keep = [i for i, x in enumerate(ids) if len(x) < limit]
    prompts, ids = [prompts[i] for i in keep], [ids[i] for i in keep]
    start = time.perf_counter()
    with torch.inference_mode():
        outs = LLM(engine=engine).generate(ids, SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=True)
    seconds = time.perf_counter() - start
    examples = [Example(i, p.source, p.text, x, len(o.outputs[0].token_ids), o.outputs[0].finish_reason or "")
                for i, (p, x, o) in enumerate(zip(prompts, ids, outs))]
    meta = {"model_dir": str(model_dir), "tokenizer_fingerprint": tok.fingerprint(), "max_tokens": max_tokens,
            "seed": seed, "num_prompts": len(examples), "dropped_too_long": num_prompts - len(examples),
            "device": device, "dtype": dtype, "machine": machine_name(device), "generation_seconds": seconds,
            "output_tokens": sum(e.output_len for e in examples)}
    with staged_dir(out_dir, replace=True) as tmp:
        write_json(tmp / "meta.json", meta)
        (tmp / "lengths.jsonl").write_text("".join(json.dumps(e.__dict__) + "\n" for e in examples))
    return meta


def load_collection(path: Path) -> tuple[dict, list[Example]]:
    """A collection directory's meta and examples; a GlassboxError names a missing or malformed part."""
    path = Path(path)
    meta_path, rows_path = path / "meta.json", path / "lengths.jsonl"
    if not meta_path.is_file() or not rows_path.is_file():
        raise GlassboxError(f"ltr collection {path}: needs meta.json and lengths.jsonl (what `glassbox ltr "
                            "collect` writes)")
    meta = json.loads(meta_path.read_text())
    examples = []
    for n, line in enumerate(rows_path.read_text().splitlines(), 1):
        try:
            examples.append(Example(**json.loads(line)))
        except (TypeError, ValueError) as e:
            raise GlassboxError(f"ltr collection {rows_path}:{n}: malformed row ({e})") from None
    if len(examples) < 4:
        raise GlassboxError(f"ltr collection {path}: {len(examples)} examples; a ranker needs at least 4")
    return meta, examples


def machine_name(device: str) -> str:
    """The machine a figure was measured on, for result tables."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    import os

    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
