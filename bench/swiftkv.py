"""SwiftKV: prefill compute and speed, long-prompt serving throughput, KV capacity, and quality after distillation.

All measured side by side in one process, base model against its SwiftKV transform on the same engine:

- prefill: FLOPs per prompt token, counted by torch's FlopCounterMode over the engine's prefill of one prompt, and
  TTFT / prefill tokens/s of one request (max_tokens 1, prefix caching off) at each --prompt-lens, median of
  --repeats after a warm-up; base, l = L/2 and l = 0.75 L. Model: a random-init Llama (on CUDA ~410M parameters,
  24 layers; on the CPU 7M, 8 layers).
- long prompts: --requests requests arriving as a Poisson process (--rate per second), prompts of 0.5-1 x the
  longest --prompt-lens (2k-4k tokens on the GPU), outputs 64-256 tokens (EOS ignored); output tok/s over the
  makespan and the median TPOT; base vs l = L/2.
- KV capacity: bytes per token and the pool the engine sizes from the same memory budget, in tokens; base vs
  l = L/2 with AcrossKV g = 1, 2, 4. The gain is capacity / base capacity - 1.
- quality: the teacher's answers (glassbox's engine) to --teacher-prompts (default a mix of instructions and
  Python-stdlib explanations: teacher_prompts()), SwiftKV l = L/2 distilled on them
  with `glassbox train`'s distillation objective, then on held-out answers: response-token loss (teacher vs
  student), greedy agreement (teacher-forced argmax), and three tasks scored by rule: capitals (the answer names
  the city), yes/no questions answered with the right word alone, addition (the answer's last number). The model
  is --model-dir (SmolLM2-135M-Instruct on the GPU), else a random one.
- init (--init-check, alone): the copy-init against the least-squares init of the K/V projections (`swiftkv
  convert --init lsq`) at l = L/2 and 0.75 L of --model-dir, forward only: held-out KL(teacher || student), greedy
  agreement and K/V reconstruction error before any distillation (results: swiftkv_init[_cpu]).

Summary (fractions; task delta in points, negative is worse): prefill_speedup_4k, ttft_reduction_4k,
throughput_ratio_long_prompt, kv_capacity_gain_g2, kv_capacity_gain_g4, loss_rel_delta, task_acc_delta_worst.

    python bench/swiftkv.py --device cpu                                           # small, ~3 minutes on 2 cores
    python bench/swiftkv.py --device cuda --model-dir /path/to/smollm2-hf          # one H200, ~4 minutes
    python bench/swiftkv.py --init-check --threads 2 --model-dir /path/to/smollm2-hf  # 2 CPU cores, ~6 minutes
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch

from glassbox import atomic
from glassbox.inference.engine import EngineConfig, LLMEngine
from glassbox.inference.piecewise import piecewise_sizes
from glassbox.inference.model_runner import kv_bytes_per_block
from glassbox.inference.sampling_params import SamplingParams
from glassbox.models.swiftkv import SwiftKVConfig, SwiftKVTransformer, swiftkv_from_base
from glassbox.models.transformer import ModelConfig, Transformer

RESULTS = Path(__file__).resolve().parent / "results"
INSTRUCTION_PROMPTS = Path(__file__).resolve().parent / "traces" / "ltr_prompts.jsonl.gz"
TEACHER_PROMPT_KINDS = {"stdlib": "requests to explain Python stdlib functions",
                        "mix": "a mix of instructions (bench/traces/ltr_prompts.jsonl.gz) and stdlib explanations"}

PRESETS = {
    "cpu": dict(vocab_size=4096, hidden_size=256, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=688,
                max_seq_len=1200),
    "gpu": dict(vocab_size=32000, hidden_size=1024, num_layers=24, num_heads=16, num_kv_heads=8,
                intermediate_size=4096, max_seq_len=8448),
}
SIZES = {
    "cpu": dict(prompt_lens=[256, 512, 1024], repeats=3, requests=8, rate=4.0, out_lens=(16, 48),
                teacher_prompts=160, teacher_tokens=48, distill_steps=40, seq_len=256, batch=8, task_items=20),
    "cuda": dict(prompt_lens=[1024, 2048, 4096, 8192], repeats=5, requests=64, rate=48.0, out_lens=(64, 256),
                 teacher_prompts=1200, teacher_tokens=128, distill_steps=240, seq_len=512, batch=16, task_items=100),
}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def variants(base: Transformer) -> dict[str, Transformer]:
    L = base.config.num_layers
    return {"base": base, "l=L/2": swiftkv_from_base(base, SwiftKVConfig(L // 2)),
            "l=0.75L": swiftkv_from_base(base, SwiftKVConfig(3 * L // 4))}


def run_one(engine: LLMEngine, prompt: list[int], max_tokens: int = 1) -> float:
    """Seconds from adding a request to its end (max_tokens 1: its time to first token)."""
    sync(engine.config.device)
    t0 = time.perf_counter()
    engine.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    sync(engine.config.device)
    return time.perf_counter() - t0


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Attention FLOPs with grouped-query heads (K/V heads fewer than Q heads, broadcast by the kernel): QK^T and
    PV at the query heads. torch 2.11's own formula refuses such shapes (2.13's accepts them); counting them the
    same way on both keeps GPU and CPU figures comparable."""
    b, h, s_q, d = query_shape
    s_k, d_v = key_shape[2], value_shape[3]
    return 2 * b * h * s_q * s_k * d + 2 * b * h * s_q * s_k * d_v


def _sdpa_mapping() -> dict:
    aten = torch.ops.aten
    ops = [aten._scaled_dot_product_efficient_attention, aten._scaled_dot_product_flash_attention,
           getattr(aten, "_scaled_dot_product_cudnn_attention", None)]
    return {op: _sdpa_flops for op in ops if op is not None}


def prefill_engine(model: Transformer, args, max_len: int) -> LLMEngine:
    """An engine for one request at a time whose prompt of up to `max_len` tokens is one step, prefix cache off."""
    cfg = EngineConfig(device=args.device, dtype=args.dtype, cuda_graphs=False, enable_prefix_caching=False,
                       max_num_batched_tokens=max_len, max_model_len=max_len + 8, max_num_seqs=4,
                       num_kv_blocks=-(-(max_len + 16) // 16) * 2)
    return LLMEngine(model, config=cfg)


def time_prefill_on(engine: LLMEngine, args, max_len: int) -> None:
    """The runner TTFT is timed on: the engine's attention choice, and with --piecewise the prompt steps as
    piecewise graphs."""
    timed = dict(attention="auto")
    if args.piecewise:
        timed.update(cuda_graphs=True, piecewise=piecewise_sizes(max_len))
    engine.runner = engine.runner.replaced(**timed)


def prefill(models: dict[str, Transformer], args, sizes: dict) -> dict:
    """Counted FLOPs per prompt token and measured TTFT at each prompt length, per model."""
    from torch.utils.flop_counter import FlopCounterMode

    lens = sizes["prompt_lens"]
    rng = random.Random(0)
    vocab = next(iter(models.values())).config.vocab_size
    out: dict = {}
    for name, model in models.items():
        engine = prefill_engine(model, args, max(lens))
        prompts = {n: [rng.randrange(vocab) for _ in range(n)] for n in lens}
        # FLOPs are counted on the dense attention path, eagerly, which computes the same: the varlen kernel the
        # engine times on CUDA takes packed tensors whose sequence lengths are values, which no FLOP formula
        # (shapes only) can see, and a graph replay shows the counter nothing.
        engine.runner = engine.runner.replaced(attention="dense")
        flops = {}
        for n, prompt in prompts.items():
            with FlopCounterMode(display=False, custom_mapping=_sdpa_mapping()) as counter:
                run_one(engine, prompt)
            flops[n] = counter.get_total_flops() / n
        time_prefill_on(engine, args, max(lens))
        row: dict = {}
        for n, prompt in prompts.items():
            run_one(engine, prompt)                         # warm-up at this shape
            times = [run_one(engine, prompt) for _ in range(sizes["repeats"])]
            ttft = statistics.median(times)
            row[n] = {"flops_per_token": flops[n], "ttft_s": ttft, "prefill_tok_s": n / ttft}
        out[name] = row
        del engine
        free(args.device)
    return out


def long_prompt(models: dict[str, Transformer], args, sizes: dict) -> dict:
    """Poisson arrivals of long prompts with short outputs; output tok/s and TPOT per model, same requests."""
    longest = max(sizes["prompt_lens"]) if args.device == "cpu" else 4096
    rng = random.Random(1)
    vocab = next(iter(models.values())).config.vocab_size
    lo, hi = sizes["out_lens"]
    t, reqs = 0.0, []
    for _ in range(sizes["requests"]):
        t += rng.expovariate(sizes["rate"])
        reqs.append((t, [rng.randrange(vocab) for _ in range(rng.randint(longest // 2, longest))],
                     rng.randint(lo, hi)))
    out = {}
    for name, model in models.items():
        blocks = sum(-(-(len(p) + m) // 16) for _, p, m in reqs) + 16
        cfg = EngineConfig(device=args.device, dtype=args.dtype, max_num_seqs=64, max_num_batched_tokens=4096,
                           max_model_len=longest + hi + 8, num_kv_blocks=blocks, enable_prefix_caching=False,
                           piecewise_graphs=args.piecewise)
        engine = LLMEngine(model, config=cfg)
        run_one(engine, reqs[0][1][:256], 4)                  # warm-up
        pending = list(enumerate(reqs))
        done = {}
        start = time.perf_counter()
        while pending or engine.has_unfinished():
            now = time.perf_counter() - start
            while pending and pending[0][1][0] <= now:
                i, (_, prompt, m) = pending.pop(0)
                engine.add_request(f"q{i}", prompt, SamplingParams(temperature=0, max_tokens=m, ignore_eos=True))
            if not engine.has_unfinished():
                time.sleep(max(0.0, pending[0][1][0] - now))
                continue
            for o in engine.step():
                if o.finished:
                    done[o.request_id] = o
        makespan = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in done.values())
        tpots = [o.latency()[1] for o in done.values() if o.latency()[1] is not None]
        out[name] = {"output_tok_s": tokens / makespan, "tpot_median_s": statistics.median(tpots),
                     "makespan_s": makespan, "requests": len(done)}
        del engine
        free(args.device)
    return out


def kv_capacity(base: Transformer, args) -> dict:
    """The pool the engine sizes from one memory budget, base vs SwiftKV l = L/2 with g = 1, 2, 4."""
    L = base.config.num_layers
    models = {"base": base}
    for g in (1, 2, 4):
        models[f"g={g}"] = swiftkv_from_base(base, SwiftKVConfig(L // 2, g))
    per_token = {n: kv_bytes_per_block(m, 16, base.embed_tokens.weight.dtype) / 16 for n, m in models.items()}
    # CPU: a fixed budget of 64 full-length sequences of the base; CUDA: the card's memory, as served.
    budget = 64 * base.config.max_seq_len * per_token["base"] / 1024**3
    out = {}
    for name, model in models.items():
        cfg = EngineConfig(device=args.device, dtype=args.dtype, cuda_graphs=False, gpu_memory_utilization=0.5,
                           cpu_kv_cache_gb=budget, max_num_seqs=10**6, max_num_batched_tokens=2048)
        engine = LLMEngine(model, config=cfg)
        cache_bytes = sum(t.numel() * t.element_size() for t in engine.runner.k_cache + engine.runner.v_cache)
        out[name] = {"bytes_per_token": per_token[name], "kv_caches": len(engine.runner.k_cache),
                     "capacity_tokens": engine.blocks.num_blocks * 16, "pool_bytes": cache_bytes}
        del engine
        free(args.device)
    for row in out.values():
        row["capacity_gain"] = row["capacity_tokens"] / out["base"]["capacity_tokens"] - 1
    return out


# Quality ---------------------------------------------------------------------------------------------------


CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Germany", "Berlin"),
            ("Spain", "Madrid"), ("Russia", "Moscow"), ("China", "Beijing"), ("England", "London"),
            ("Greece", "Athens"), ("Canada", "Ottawa"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
            ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Portugal", "Lisbon"), ("Austria", "Vienna"),
            ("Ireland", "Dublin"), ("Poland", "Warsaw"), ("Thailand", "Bangkok"), ("Argentina", "Buenos Aires"),
            ("South Korea", "Seoul"), ("Cuba", "Havana"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
            ("Hungary", "Budapest"), ("Belgium", "Brussels"), ("Turkey", "Ankara"), ("Iran", "Tehran"),
            ("Chile", "Santiago"), ("Vietnam", "Hanoi")]
FACTS = [("is water wet", "yes"), ("is fire cold", "no"), ("is the sun hot", "yes"), ("is ice hot", "no"),
         ("do fish live in water", "yes"), ("can dogs fly", "no"), ("is snow white", "yes"),
         ("is grass blue", "no"), ("do birds have wings", "yes"), ("is the moon made of cheese", "no"),
         ("is two larger than one", "yes"), ("is ten smaller than three", "no"), ("do cats bark", "no"),
         ("is the ocean salty", "yes"), ("do humans need air", "yes"), ("can a rock sing", "no"),
         ("is summer warmer than winter", "yes"), ("is a mouse bigger than an elephant", "no"),
         ("is Paris in France", "yes"), ("is London in Japan", "no")]


def task_items(n: int) -> dict[str, list[tuple[str, str]]]:
    """Tasks scored by rule: capitals (knowledge: the answer names the city), yes/no (instruction following:
    the answer is only the right word), addition (the answer's last number is the sum)."""
    rng = random.Random(5)
    add = [(rng.randint(1, 60), rng.randint(1, 40)) for _ in range(n)]
    return {"capitals": [(f"What is the capital of {c}?", city) for c, city in CAPITALS[:n]],
            "yes_no": [(f"Answer with only yes or no: {q}?", a) for q, a in FACTS[:n]],
            "addition": [(f"What is {a} + {b}?", str(a + b)) for a, b in add]}


def score(task: str, answer: str, expected: str) -> bool:
    if task == "capitals":
        return expected.lower() in answer.lower()
    if task == "yes_no":
        return answer.strip().strip(".!").lower() == expected
    numbers = re.findall(r"-?\d+", answer)
    return bool(numbers) and numbers[-1] == expected


def task_accuracy(model_dir: Path, items: dict, args) -> dict[str, float]:
    from glassbox.inference.llm import LLM

    llm = LLM(engine=LLMEngine.from_model_dir(model_dir, EngineConfig(device=args.device, dtype=args.dtype,
                                                                      max_num_seqs=64)))
    tok = llm.tokenizer
    acc = {}
    for task, pairs in items.items():
        prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q, _ in pairs]
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=48))
        acc[task] = sum(score(task, o.outputs[0].text, e) for o, (_, e) in zip(outs, pairs)) / len(pairs)
    del llm
    free(args.device)
    return acc


@torch.no_grad()
def heldout_metrics(model: SwiftKVTransformer, tokens: torch.Tensor, marker: list[int], eod: int) -> dict:
    """Response-token loss of teacher and student, and their teacher-forced greedy agreement, on held-out samples."""
    import torch.nn.functional as F

    from glassbox.train.distill import response_mask

    sums = {"teacher": 0.0, "student": 0.0, "agree": 0.0}
    count = 0
    for chunk in tokens.split(4):
        chunk = chunk.to(model.lm_head.weight.device)
        mask = response_mask(chunk[:, 1:], marker, eod)
        with torch.autocast(chunk.device.type, dtype=torch.bfloat16, enabled=chunk.device.type == "cuda"):
            t = model(chunk[:, :-1], swiftkv=False).float()
            s = model(chunk[:, :-1]).float()
        tgt = chunk[:, 1:]
        for name, logits in (("teacher", t), ("student", s)):
            ce = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), reduction="none").view_as(tgt)
            sums[name] += float((ce * mask).sum())
        sums["agree"] += float(((t.argmax(-1) == s.argmax(-1)) & mask).sum())
        count += int(mask.sum())
    return {"teacher_loss": sums["teacher"] / count, "student_loss": sums["student"] / count,
            "greedy_agreement": sums["agree"] / count, "response_tokens": count}


def teacher_prompts(kind: str, count: int, seed: int = 0) -> list[str]:
    """The prompts the teacher answers for distillation. `stdlib`: requests to explain Python standard-library
    functions, only. `mix`: half of them instructions from bench/traces/ltr_prompts.jsonl.gz (short, medium and
    long answers, reasoning-gym tasks, HumanEval; none of the tasks' items), so the student is distilled on the kind
    of requests it is scored on: distilled on explanations alone, the H200's student (session 6) kept capitals
    (-3.3 points) but lost yes/no (30% -> 0%) and addition (14% -> 1%)."""
    from glassbox.inference.ltr.prompts import load_prompts
    from glassbox.train.distill_data import stdlib_prompts

    if kind == "stdlib":
        return stdlib_prompts(count, seed)
    instructions = [p.text for p in load_prompts(INSTRUCTION_PROMPTS)]
    random.Random(seed).shuffle(instructions)
    picked = instructions[:count // 2]
    mixed = picked + stdlib_prompts(count - len(picked), seed)
    random.Random(seed + 1).shuffle(mixed)
    return mixed


def quality(model_dir: Path, work: Path, args, sizes: dict) -> dict:
    from glassbox.checkpoints.hf_swiftkv import convert, export_swiftkv_checkpoint, load_swiftkv_model_dir
    from glassbox.data.sampler import build_sampler
    from glassbox.data.store import TokenStore
    from glassbox.train.config import run_config_from_dict
    from glassbox.train.distill import marker_ids
    from glassbox.train.distill_data import generate_teacher_data
    from glassbox.train.trainer import Trainer

    t0 = time.perf_counter()
    prompts = teacher_prompts(args.teacher_prompts, sizes["teacher_prompts"])
    data = generate_teacher_data(model_dir, prompts, work / "data",
                                 max_new_tokens=sizes["teacher_tokens"], valid_fraction=0.1,
                                 engine_options={"device": args.device, "dtype": args.dtype, "max_num_seqs": 128})
    teacher_s = time.perf_counter() - t0
    free(args.device)                 # the teacher's engine and its KV pool
    n_layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    # The student starts from --init: "lsq" fits its K/V projections on the teacher data's train split (the
    # distribution it is then distilled on), "copy" is the paper's initialisation.
    calib = str(data.data_dir) if args.init == "lsq" else None
    skv_dir = convert(model_dir, n_layers // 2, 1, work / "skv", init=args.init, calib=calib)
    cfg = run_config_from_dict({
        "init_from": str(skv_dir), "model": {"max_seq_len": sizes["seq_len"]},
        "data": {"path": str(data.data_dir), "seq_len": sizes["seq_len"], "seed": 1},
        "distill": {"enabled": True, "response_marker": data.response_marker,
                    "hidden_mse_weight": args.hidden_mse_weight},
        "optimizer": {"lr": args.distill_lr or (2e-4 if args.device != "cpu" else 1e-3), "min_lr": 2e-5,
                      "weight_decay": 0.0},
        "schedule": {"steps": sizes["distill_steps"], "warmup_steps": min(10, sizes["distill_steps"])},
        "batch": {"global_batch_size": sizes["batch"], "micro_batch_size": sizes["batch"]},
        "parallel": {"device": "cuda" if args.device != "cpu" else "cpu"},
        "logging": {"val_every": 0, "val_samples": 2, "progress": False, "wandb": {"mode": "disabled"}},
        "run_dir": str(work / "run"),
    })
    store = TokenStore(data.data_dir)
    marker = marker_ids(store.tokenizer(), data.response_marker)
    held = build_sampler(cfg.data, "valid")
    held_out = held.samples(0, min(held.epoch_size, 64))
    device = torch.device("cuda" if args.device != "cpu" else "cpu")
    before = heldout_metrics(load_swiftkv_model_dir(skv_dir, device=device)[0], held_out, marker, store.eod_id)
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    trainer.fit()
    distill_s = time.perf_counter() - t0
    after = heldout_metrics(trainer.state.model.eval(), held_out, marker, store.eod_id)
    del trainer
    free(args.device)
    trained = export_swiftkv_checkpoint(work / "run", skv_dir, work / "skv-distilled")
    items = task_items(sizes["task_items"])
    acc = {"base": task_accuracy(model_dir, items, args), "swiftkv": task_accuracy(trained, items, args)}
    deltas = {t: 100 * (acc["swiftkv"][t] - acc["base"][t]) for t in items}
    return {"teacher_docs": data.num_documents, "teacher_tokens": data.response_tokens, "teacher_s": teacher_s,
            "teacher_prompts": args.teacher_prompts,
            "distill_steps": sizes["distill_steps"], "distill_s": distill_s, "layer": n_layers // 2, "init": args.init,
            "distill_lr": cfg.optimizer.lr, "hidden_mse_weight": cfg.distill.hidden_mse_weight,
            "before_distill": before, "after_distill": after, "task_accuracy": acc, "task_delta_points": deltas,
            "loss_rel_delta": after["student_loss"] / after["teacher_loss"] - 1}


def random_model_dir(shape: dict, out: Path) -> Path:
    """A random-init Llama directory with a byte-level BPE over the stdlib (CPU quality runs need a tokenizer)."""
    from glassbox.checkpoints.hf_format import save_hf_model_dir
    from glassbox.data.prepare import prepare

    data = prepare(["stdlib"], out.with_name("tok-data"), vocab_size=shape["vocab_size"], max_bytes=400_000,
                   progress=False)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**shape))
    return save_hf_model_dir(model, out, tokenizer_json=data.out / "tokenizer.json")


# Initialisation: copy vs least squares ---------------------------------------------------------------------


INIT_SIZES = dict(teacher_prompts=64, teacher_tokens=96, calib_tokens=4096, seq_len=256, held_out_rows=6, batch=2)


def kv_fits(base: Transformer, layers: list[int], calib: torch.Tensor,
            batch: int) -> dict[tuple[int, str], SwiftKVTransformer]:
    """(l, "copy" | "lsq") -> SwiftKV model at each l: the copy-init, and the copy-init with K/V fit by least
    squares (models/swiftkv.py) on `calib`, all the fits fed by one pass of the teacher."""
    from glassbox.models.swiftkv import DEFAULT_RIDGE, KVLeastSquares, teacher_layer_inputs

    models = {(l, init): swiftkv_from_base(base, SwiftKVConfig(l)) for l in layers for init in ("copy", "lsq")}
    fits = [KVLeastSquares(models[l, "lsq"]) for l in layers]
    with torch.no_grad():
        for ids in calib.split(batch):
            for j, h in teacher_layer_inputs(base, ids):
                for fit in fits:
                    fit.observe(j, h)
    for fit in fits:
        fit.apply(DEFAULT_RIDGE)
    return models


@torch.no_grad()
def teacher_agreement(base: Transformer, students: dict, held: torch.Tensor, marker: list[int], eod: int,
                      batch: int) -> dict:
    """Per student: KL(teacher || student) per token (T = 1) and teacher-forced greedy agreement, over all
    held-out positions and over the response tokens alone; the teacher runs once per batch."""
    import torch.nn.functional as F

    from glassbox.train.distill import response_mask

    sums = {name: {"kl_all": 0.0, "agree_all": 0.0, "kl_response": 0.0, "agree_response": 0.0} for name in students}
    counts = {"all": 0, "response": 0}
    for chunk in held.split(batch):
        t = F.log_softmax(base(chunk[:, :-1]).float(), -1)
        masks = {"all": torch.ones_like(chunk[:, 1:], dtype=torch.bool),
                 "response": response_mask(chunk[:, 1:], marker, eod)}
        for where, m in masks.items():
            counts[where] += int(m.sum())
        for name, model in students.items():
            s = F.log_softmax(model(chunk[:, :-1]).float(), -1)
            kl = (t.exp() * (t - s)).sum(-1)
            agree = t.argmax(-1) == s.argmax(-1)
            for where, m in masks.items():
                sums[name][f"kl_{where}"] += float((kl * m).sum())
                sums[name][f"agree_{where}"] += float((agree & m).sum())
    return {name: {k: v / counts[k.split("_")[1]] for k, v in row.items()} | {"tokens": counts}
            for name, row in sums.items()}


def init_check(model_dir: Path, work: Path, args) -> dict:
    """Copy-init vs LSQ-init of SwiftKV at l = L/2 and 0.75 L, forward only, before any distillation: the teacher's
    answers to stdlib prompts (glassbox's engine), calibration on their train split, scores on the valid split
    (other documents): KL(teacher || student), greedy agreement, K/V reconstruction error."""
    from glassbox.checkpoints.hf_format import load_hf_model_dir
    from glassbox.data.config import DataConfig
    from glassbox.data.sampler import build_sampler
    from glassbox.data.store import TokenStore
    from glassbox.models.swiftkv import DEFAULT_RIDGE, kv_reconstruction_error
    from glassbox.train.distill import marker_ids
    from glassbox.data.calibration import calibration_tokens
    from glassbox.train.distill_data import generate_teacher_data, stdlib_prompts

    sizes, times = INIT_SIZES, {}
    t0 = time.perf_counter()
    data = generate_teacher_data(model_dir, stdlib_prompts(sizes["teacher_prompts"]), work / "data",
                                 max_new_tokens=sizes["teacher_tokens"], valid_fraction=0.25,
                                 engine_options={"device": args.device, "dtype": args.dtype, "max_num_seqs": 64})
    times["teacher_data_s"] = time.perf_counter() - t0
    free(args.device)
    store = TokenStore(data.data_dir)
    calib = calibration_tokens(str(data.data_dir), model_dir / "tokenizer.json", sizes["calib_tokens"],
                               sizes["seq_len"])
    valid = build_sampler(DataConfig(path=str(data.data_dir), seq_len=sizes["seq_len"], seed=0), "valid")
    held = valid.samples(0, min(valid.epoch_size, sizes["held_out_rows"]))
    base, cfg = load_hf_model_dir(model_dir, device=args.device)
    layers = [cfg.num_layers // 2, 3 * cfg.num_layers // 4]
    t0 = time.perf_counter()
    models = kv_fits(base, layers, calib.to(args.device), sizes["batch"])
    times["fit_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    marker = marker_ids(store.tokenizer(), data.response_marker)
    scores = teacher_agreement(base, {f"l={l} {init}": m for (l, init), m in models.items()}, held.to(args.device),
                               marker, store.eod_id, sizes["batch"])
    for (l, init), m in models.items():
        scores[f"l={l} {init}"]["kv_error"] = kv_reconstruction_error(m, held[:2, :-1].to(args.device))
    times["score_s"] = time.perf_counter() - t0
    return {"model": str(model_dir), "num_layers": cfg.num_layers, "layers": layers, "ridge": DEFAULT_RIDGE,
            "calib": {"source": "teacher answers, train split", "tokens": calib.numel()},
            "held_out": {"source": "teacher answers, valid split (other documents)", "samples": held.shape[0],
                         "tokens": held.shape[0] * sizes["seq_len"]},
            "teacher_docs": data.num_documents, "scores": scores, "seconds": times}


def init_summary(r: dict) -> dict:
    out = {}
    for l in r["layers"]:
        for init in ("copy", "lsq"):
            m = r["scores"][f"l={l} {init}"]
            out[f"kl_response_l{l}_{init}"] = m["kl_response"]
            out[f"agreement_response_l{l}_{init}"] = m["agree_response"]
        out[f"kl_ratio_l{l}"] = r["scores"][f"l={l} lsq"]["kl_response"] / r["scores"][f"l={l} copy"]["kl_response"]
    return out


def init_markdown(r: dict) -> str:
    lines = [f"# SwiftKV initialisation, copy vs least squares ({r['machine']}, {r['dtype']})", "",
             f"{r['model']} ({r['num_layers']} layers), forward only, before any distillation. Calibration: "
             f"{r['calib']['tokens']} tokens of {r['calib']['source']} ({r['teacher_docs']} teacher answers to stdlib "
             f"prompts); held out: {r['held_out']['tokens']} tokens of {r['held_out']['source']}. Ridge "
             f"{r['ridge']:g}. KL(teacher || student) per token at T = 1; agreement: teacher-forced argmax; K/V "
             "error: relative squared error of the pre-RoPE keys/values over layers >= l (2 held-out samples).", "",
             "| l | init | KL, response tokens | KL, all tokens | agreement, response | agreement, all | K error | "
             "V error |", "|---|---|---|---|---|---|---|---|"]
    for name, m in r["scores"].items():
        l, init = name.split()
        lines.append(f"| {l[2:]} | {init} | {m['kl_response']:.4f} | {m['kl_all']:.4f} | {m['agree_response']:.1%} | "
                     f"{m['agree_all']:.1%} | {m['kv_error']['k']:.3f} | {m['kv_error']['v']:.3f} |")
    lines += ["", f"Response tokens: {next(iter(r['scores'].values()))['tokens']['response']} of "
                  f"{next(iter(r['scores'].values()))['tokens']['all']}. Seconds: "
                  + ", ".join(f"{k} {v:.0f}" for k, v in r["seconds"].items()) + ".", "",
              "Summary: " + ", ".join(f"{k} {v:.4f}" for k, v in r["summary"].items()), ""]
    return "\n".join(lines)


def run_init_check(args) -> None:
    if not args.model_dir:
        raise SystemExit("--init-check needs --model-dir (a Llama HF directory with its tokenizer)")
    with tempfile.TemporaryDirectory() as tmp:
        r = init_check(args.model_dir, Path(tmp), args)
    r.update(machine=machine_name(args), device=args.device, dtype=args.dtype)
    r["summary"] = init_summary(r)
    stem = args.out_name or ("swiftkv_init" if args.device.startswith("cuda") else "swiftkv_init_cpu")
    RESULTS.mkdir(exist_ok=True)
    atomic.write_text(RESULTS / f"{stem}.json", json.dumps(r, indent=2) + "\n")
    atomic.write_text(RESULTS / f"{stem}.md", init_markdown(r))
    print(init_markdown(r))


# Results ---------------------------------------------------------------------------------------------------


def machine_name(args) -> str:
    if args.device.startswith("cuda"):
        return torch.cuda.get_device_name(args.device)
    return (f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, load average "
            f"{os.getloadavg()[0]:.1f} at the end")


def summarize(pre: dict, lp: dict, kv: dict, q: dict | None) -> dict:
    n = 4096 if 4096 in pre["base"] else max(pre["base"])
    base, skv = pre["base"][n], pre["l=L/2"][n]
    return {
        "prefill_speedup_4k": skv["prefill_tok_s"] / base["prefill_tok_s"],
        "ttft_reduction_4k": 1 - skv["ttft_s"] / base["ttft_s"],
        "prefill_flops_ratio_4k": skv["flops_per_token"] / base["flops_per_token"],
        "prefill_measured_at": n,
        "throughput_ratio_long_prompt": lp["l=L/2"]["output_tok_s"] / lp["base"]["output_tok_s"],
        "tpot_ratio_long_prompt": lp["l=L/2"]["tpot_median_s"] / lp["base"]["tpot_median_s"],
        "kv_capacity_gain_g2": kv["g=2"]["capacity_gain"],
        "kv_capacity_gain_g4": kv["g=4"]["capacity_gain"],
        "loss_rel_delta": q["loss_rel_delta"] if q else None,
        "task_acc_delta_worst": min(q["task_delta_points"].values()) if q else None,
    }


def markdown(result: dict) -> str:
    r = result
    lines = [f"# SwiftKV ({r['machine']}, {r['dtype']})", "",
             f"Prefill model: random-init Llama, {r['prefill_model']['num_layers']} layers, "
             f"{r['prefill_model']['params'] / 1e6:.0f}M parameters; prompt steps "
             f"{'as piecewise graphs' if r.get('piecewise_graphs') else 'eager'}.", "",
             "| model | prompt tokens | FLOPs / prompt token (counted) | TTFT ms | prefill tok/s |",
             "|---|---|---|---|---|"]
    for name, rows in r["prefill"].items():
        for n, row in rows.items():
            lines.append(f"| {name} | {n} | {row['flops_per_token'] / 1e6:.1f}M | {row['ttft_s'] * 1e3:.1f} | "
                         f"{row['prefill_tok_s']:.0f} |")
    lines += ["", "| long prompts, Poisson | output tok/s | TPOT median ms | makespan s |", "|---|---|---|---|"]
    for name, row in r["long_prompt"].items():
        lines.append(f"| {name} | {row['output_tok_s']:.1f} | {row['tpot_median_s'] * 1e3:.1f} | "
                     f"{row['makespan_s']:.1f} |")
    lines += ["", "| KV (l = L/2) | caches | bytes / token | pool tokens | gain |", "|---|---|---|---|---|"]
    for name, row in r["kv_capacity"].items():
        lines.append(f"| {name} | {row['kv_caches']} | {row['bytes_per_token']:.0f} | {row['capacity_tokens']} | "
                     f"{row['capacity_gain']:+.1%} |")
    q = r.get("quality")
    if q:
        lines += ["", f"Quality: {q['model']}, l = {q['layer']}, {q['distill_steps']} distillation steps on "
                      f"{q['teacher_docs']} teacher answers ({q['teacher_tokens']} tokens) to "
                      f"{TEACHER_PROMPT_KINDS[q.get('teacher_prompts', 'stdlib')]}, lr "
                      f"{q.get('distill_lr', 2e-4):g}, hidden-state MSE weight "
                      f"{q.get('hidden_mse_weight', 1.0):g}, K/V init {q.get('init', 'copy')}.", "",
                  "| held-out responses | teacher loss | student loss | greedy agreement |", "|---|---|---|---|"]
        for when in ("before_distill", "after_distill"):
            m = q[when]
            lines.append(f"| {when.replace('_', ' ')} | {m['teacher_loss']:.4f} | {m['student_loss']:.4f} | "
                         f"{m['greedy_agreement']:.1%} |")
        lines += ["", "| task | base | SwiftKV distilled | delta (points) |", "|---|---|---|---|"]
        for task, d in q["task_delta_points"].items():
            lines.append(f"| {task} | {q['task_accuracy']['base'][task]:.1%} | "
                         f"{q['task_accuracy']['swiftkv'][task]:.1%} | {d:+.1f} |")
    lines += ["", "Summary: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in r["summary"].items()), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model-dir", type=Path, help="a Llama HF directory for the quality part (SmolLM2 on GPU)")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--teacher-prompts", choices=sorted(TEACHER_PROMPT_KINDS), default="mix",
                    help="quality: what the teacher answers for distillation (teacher_prompts())")
    ap.add_argument("--teacher-count", type=int, default=None, help="quality: prompts (default 160 CPU, 1200 GPU)")
    ap.add_argument("--distill-steps", type=int, default=None, help="quality: steps (default 40 CPU, 240 GPU)")
    ap.add_argument("--init", choices=["lsq", "copy"], default="lsq",
                    help="quality: the student's K/V initialisation before distillation (default lsq)")
    ap.add_argument("--distill-lr", type=float, default=None, help="default 2e-4 on CUDA (Snowflake's), 1e-3 on CPU")
    ap.add_argument("--hidden-mse-weight", type=float, default=0.0,
                    help="weight of the hidden-state MSE beside T^2 x KL (default 0, as Snowflake's Llama recipes: "
                         "SmolLM2's MSE starts ~50x the KL term; on the CPU, 30 steps: held-out loss +23.8%% "
                         "over the teacher at 0 vs +26.8%% at 1)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--piecewise", action="store_true",
                    help="time prefill and the long-prompt load with piecewise graphs (CUDA: prompt steps as graphs)")
    ap.add_argument("--out-name", default=None, help="results file stem (default swiftkv, or swiftkv_cpu on CPU)")
    ap.add_argument("--init-check", action="store_true",
                    help="only compare the copy and least-squares initialisations on --model-dir, forward only "
                         "(results: swiftkv_init[_cpu])")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    args.dtype = "bfloat16" if cuda else "float32"
    if args.init_check:
        run_init_check(args)
        return
    sizes = dict(SIZES["cuda" if cuda else "cpu"])
    sizes["teacher_prompts"] = args.teacher_count or sizes["teacher_prompts"]
    sizes["distill_steps"] = args.distill_steps or sizes["distill_steps"]
    shape = PRESETS["gpu" if cuda else "cpu"]
    torch.manual_seed(0)
    with torch.device(args.device):
        base = Transformer(ModelConfig(**shape)).to(torch.bfloat16 if cuda else torch.float32).eval()
    models = variants(base)
    t0 = time.perf_counter()
    pre = prefill(models, args, sizes)
    lp = long_prompt({k: models[k] for k in ("base", "l=L/2")}, args, sizes)
    del models
    free(args.device)
    kv = kv_capacity(base, args)
    del base
    free(args.device)
    q = None
    if not args.skip_quality:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            model_dir = args.model_dir or random_model_dir(dict(PRESETS["cpu"], num_layers=4, max_seq_len=512),
                                                           work / "model")
            q = quality(model_dir, work, args, sizes)
            q["model"] = str(args.model_dir) if args.model_dir else "random-init Llama (4 layers, CPU run)"
    result = {"machine": machine_name(args), "device": args.device, "dtype": args.dtype,
              "piecewise_graphs": args.piecewise,
              "prefill_model": {**shape, "params": ModelConfig(**shape).num_params()},
              "prefill": pre, "long_prompt": lp, "kv_capacity": kv, "quality": q,
              "seconds": time.perf_counter() - t0}
    result["summary"] = summarize(pre, lp, kv, q)
    stem = args.out_name or ("swiftkv" if cuda else "swiftkv_cpu")
    RESULTS.mkdir(exist_ok=True)
    atomic.write_text(RESULTS / f"{stem}.json", json.dumps(result, indent=2, default=str) + "\n")
    atomic.write_text(RESULTS / f"{stem}.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
