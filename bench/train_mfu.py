"""Training throughput and MFU: glassbox against torchtitan and transformers, same model, same GPU, one call.

Every system trains the same Llama shape (layers, width, heads, KV heads, MLP, vocab 32000, untied embeddings)
at the same per-GPU batch and sequence length, in bf16 with fp32 master weights and fused AdamW, on batches of
random token ids made on the GPU once (throughput does not depend on the text), except the full glassbox
trainer, which reads a prepared token store as a real run does:

- glassbox: the full trainer's steps as `Trainer.fit()` runs them (each step queued with `queue_step()` before the
  previous one is read back with `finish_step()`), over a prepared token store (sampler, prefetch, data-order
  log and metrics row included; no callbacks), with torch.compile per block and of the loss, bf16
  autocast, SDPA with cuDNN attention first, fused AdamW, and FSDP2 (bf16 params, fp32 reduce) on several GPUs.
- glassbox-core: the same model, parallel wrapper, optimizer groups and step math on device-resident batches,
  without the trainer's data loading and logging: the ceiling the full trainer is measured against.
- torchtitan 0.3.0: its Llama3 model built from its own config classes and its `parallelize_llama` (compile per
  block, FSDP2 with bf16 params / fp32 reduce), its cross-entropy loss (compiled), its optimizer container (fused
  AdamW) and its gradient clipping; its SDPA attention module; its full activation checkpointing only with
  `--ac`; none of its trainer's dataset stack (its Trainer class needs a tokenizer and HF datasets).
- transformers: `LlamaForCausalLM` with SDPA, bf16 autocast over fp32 weights, fused AdamW, eager, one GPU (DDP
  when several).

MFU follows the PaLM convention the issue fixes:
    FLOPs per token = 6 x non-embedding parameters + 12 x layers x hidden x sequence
(the 6N term counts the forward and backward matmuls, the second term attention's QK^T and AV without causal
halving; embeddings and the LM head are left out), so
    MFU = FLOPs per token x tokens per second per GPU / peak,
with peak the datasheet dense bf16 rate (989 TFLOP/s for H100 SXM and H200). The bench also measures the card's
own bf16 matmul rate (8192^3 products) and reports MFU against it (`mfu_measured_peak`).

Each (system, size, GPU count) runs in a fresh `torchrun` process so that compile caches, CUDA memory and NCCL
state never leak between rows; `--concurrent N` runs one-GPU rows N at a time, each alone on its own GPU. Step
times come from CUDA events recorded every step and read once at the end (no host sync added to the timed
loop; events also count the host's gaps between steps); the row reports the median step.

    python bench/train_mfu.py --concurrent 2            # all systems, 125M / 350M / 1B, one GPU per row
    python bench/train_mfu.py --gpus 2 --sizes 1B --systems glassbox,torchtitan --append
    python bench/train_mfu.py --sizes 3B --ac --tag ac --append --run-timeout 900   # fits one GPU only with AC
    python bench/train_mfu.py --sizes tiny --device cpu # seconds on a CPU: checks the code paths, not speed

Writes bench/results/train_mfu.json (a list of rows) and bench/results/train_mfu.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
STARTED = time.perf_counter()
SYSTEMS = ("glassbox", "glassbox-core", "torchtitan", "transformers")


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int
    batch: int          # sequences per GPU per step
    seq: int = 2048
    vocab: int = 32000


SHAPES = {
    "125M": Shape(hidden=768, layers=12, heads=12, kv_heads=4, mlp=2048, batch=16),
    "350M": Shape(hidden=1024, layers=24, heads=16, kv_heads=8, mlp=2816, batch=16),
    "1B": Shape(hidden=2048, layers=16, heads=16, kv_heads=8, mlp=5632, batch=8),
    # 3.0B parameters (Llama-3.2-3B's width, depth and GQA) at 65k tokens per step: ~45 GiB of fp32 weights,
    # gradients and AdamW moments plus ~150 GiB of activations does not fit one 141 GB GPU; with activation
    # checkpointing (--ac) the activations drop to ~45 GiB (a residual per block, one block's recompute, logits).
    "3B": Shape(hidden=3072, layers=28, heads=24, kv_heads=8, mlp=8192, batch=32),
    "tiny": Shape(hidden=64, layers=2, heads=4, kv_heads=2, mlp=128, batch=2, seq=64, vocab=512),
}


def model_config(shape: Shape):
    """The shape as glassbox's ModelConfig: one place that counts parameters and FLOPs for every system."""
    from glassbox.models.transformer import ModelConfig

    return ModelConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, num_layers=shape.layers,
                       num_heads=shape.heads, num_kv_heads=shape.kv_heads, intermediate_size=shape.mlp,
                       max_seq_len=shape.seq, tie_embeddings=False)


# ----------------------------------------------------------------------------------------------- the systems
# Each builder returns (step, modules): `step(tokens)` runs one optimizer step on this rank's [B, T + 1] token
# slice and returns the loss as a device tensor (never read inside the timed loop).


def build_glassbox(shape: Shape, device, args):
    """The full trainer over a prepared token store (sampler, data-order log, metrics row and all), configured as
    a GPU run is (compile on, bf16, FSDP2 when there are several GPUs), its steps overlapped as `Trainer.fit()`
    overlaps them between checkpoints: each step is queued before the previous one is finished."""
    import tempfile

    import torch.distributed as dist

    from glassbox.train.config import run_config_from_dict
    from glassbox.train.trainer import Trainer

    world = dist.get_world_size()
    m = model_config(shape)
    # One run directory per torchrun job (its ranks share the launcher as parent); only rank 0 writes there.
    run_dir = Path(tempfile.gettempdir()) / f"glassbox_bench_run_{os.getppid()}"
    cfg = run_config_from_dict({
        "model": {"vocab_size": m.vocab_size, "hidden_size": m.hidden_size, "num_layers": m.num_layers,
                  "num_heads": m.num_heads, "num_kv_heads": m.num_kv_heads, "intermediate_size": m.intermediate_size,
                  "max_seq_len": m.max_seq_len, "tie_embeddings": False},
        "data": {"path": args.data, "seq_len": shape.seq},
        "schedule": {"steps": 100_000, "warmup_steps": 10},
        "batch": {"global_batch_size": shape.batch * world, "micro_batch_size": shape.batch},
        "parallel": {"device": device.type, "precision": "bf16", "compile": not args.no_compile,
                     "activation_checkpointing": args.ac, **({"data_parallel": "fsdp"} if world > 1 else {})},
        "logging": {"val_samples": world, "progress": False, "wandb": {"mode": "disabled"}},
        "run_dir": str(run_dir),
    })
    trainer = Trainer(cfg, callbacks=[])
    unfinished = []

    def step(_tokens):
        queued = trainer.queue_step()
        if unfinished:
            trainer.finish_step(unfinished.pop())
        unfinished.append(queued)
        return queued.scalars[0]

    return step, [trainer.state.model]


def build_glassbox_core(shape: Shape, device, args):
    """The trainer's model, parallel wrapper, optimizer groups, loss, attention kernels and clipping, with its
    step math, on device-resident batches and without its data loading and logging: the ceiling the full trainer
    ("glassbox") is measured against."""
    import torch

    from glassbox.train.config import ParallelConfig
    from glassbox.train.model_init import build_model
    from glassbox.train.parallel import clip_gradients, grad_sq_norm, init_world, param_groups
    from glassbox.models.loss import next_token_loss
    from glassbox.train.trainer import ATTENTION_KERNELS
    from torch.nn.attention import sdpa_kernel

    pcfg = ParallelConfig(device=device.type, precision="bf16", compile=not args.no_compile,
                          activation_checkpointing=args.ac)
    world = init_world(pcfg)
    torch.manual_seed(0)
    model = build_model(model_config(shape), pcfg, world, bf16=True)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=3e-4, betas=(0.9, 0.95), eps=1e-8,
                                  fused=device.type == "cuda")
    params = list(model.parameters())
    loss_of = next_token_loss if args.no_compile else torch.compile(next_token_loss)

    def step(tokens):
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        with torch.autocast(device.type, dtype=torch.bfloat16), sdpa_kernel(ATTENTION_KERNELS, set_priority=True):
            logits = model(inputs)
        loss = loss_of(logits, labels)
        loss.backward()
        clip_gradients(params, grad_sq_norm(params).sqrt(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step, [model]


def build_torchtitan(shape: Shape, device, args):
    import torch
    import torch.distributed as dist
    import torch.distributed.fsdp as fsdp

    if not hasattr(fsdp, "DataParallelMeshDims"):
        # torchtitan 0.3.0 imports this name from newer torch than some GPU images carry (2.11); it is used only
        # by its full-DTensor / spmd_types backends, not by the classic FSDP2 path this bench runs.
        fsdp.DataParallelMeshDims = type("DataParallelMeshDims", (), {})
    from torchtitan.components.loss import CrossEntropyLoss
    from torchtitan.components.optimizer import default_adamw
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed import utils as dist_utils
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm, ScaledDotProductAttention
    from torchtitan.models.llama3 import Llama3Model, _build_llama3_layers, parallelize_llama
    from torchtitan.models.llama3.sharding import set_llama3_sharding_config

    # The same shapes as the other systems: untied embeddings, standard (unscaled) RoPE up to the sequence.
    # Attention is torchtitan's SDPA module (causal, cuDNN then flash kernels), the kernel the other two systems
    # use; its language-model default, FlexAttention, autotunes for minutes at compile and needs document masks.
    norm_init = {"weight": torch.nn.init.ones_}
    std_init = {"weight": lambda w: torch.nn.init.normal_(w, std=0.02)}
    cfg = Llama3Model.Config(
        dim=shape.hidden, vocab_size=shape.vocab, enable_weight_tying=False,
        tok_embeddings=Embedding.Config(num_embeddings=shape.vocab, embedding_dim=shape.hidden, param_init=std_init),
        norm=RMSNorm.Config(normalized_shape=shape.hidden, param_init=norm_init),
        lm_head=Linear.Config(in_features=shape.hidden, out_features=shape.vocab, param_init=std_init),
        layers=_build_llama3_layers(
            n_layers=shape.layers, dim=shape.hidden, n_heads=shape.heads, n_kv_heads=shape.kv_heads,
            hidden_dim=shape.mlp, fuse_qkv=True, attn_backend="flex",
            rope=ComplexRoPE.Config(dim=shape.hidden // shape.heads, max_seq_len=shape.seq, theta=10000.0),
        ),
    )
    for layer in cfg.layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    parallelism = ParallelismConfig(spmd_backend="partial_dtensor")
    training = TrainingConfig(local_batch_size=shape.batch, seq_len=shape.seq, mixed_precision_param="bfloat16",
                              mixed_precision_reduce="float32")
    compile_config = CompileConfig(enable=not args.no_compile, components=["model", "loss"])
    dist_utils.set_spmd_backend(parallelism.spmd_backend)
    parallel_dims = ParallelDims.from_config(parallelism, dist.get_world_size())
    # What Llama3Model.Config.update_from_config does outside torchtitan's Trainer (which would import its
    # dataset stack): attach the model's sharding plan.
    set_llama3_sharding_config(cfg, enable_sp=parallelism.enable_sequence_parallel)
    with torch.device("meta"):
        model = cfg.build()
    ac_config = None
    if args.ac:
        from torchtitan.distributed.activation_checkpoint import FullAC
        ac_config = FullAC.Config()
    model = parallelize_llama(model, parallel_dims=parallel_dims, training=training, parallelism=parallelism,
                              compile_config=compile_config, ac_config=ac_config, dump_folder="/tmp/torchtitan")
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    model.train()
    loss_fn = CrossEntropyLoss.Config().build(compile_config=compile_config)
    implementation = "fused" if device.type == "cuda" else "foreach"
    opt_cfg = default_adamw(lr=3e-4)
    opt_cfg.implementation = implementation
    optimizers = opt_cfg.build(model_parts=[model])
    context = dist_utils.get_spmd_context(parallel_dims=parallel_dims)
    params = list(model.parameters())

    def step(tokens):
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        optimizers.zero_grad()
        with context():
            pred = model(inputs)
            loss, _ = loss_fn(pred, labels, torch.tensor(labels.numel() * dist.get_world_size(), device=device))
            del pred
            loss.backward()
        dist_utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizers.step()
        return loss.detach()

    return step, [model]


def build_transformers(shape: Shape, device, args):
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.mlp,
                            num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                            num_key_value_heads=shape.kv_heads, max_position_embeddings=shape.seq,
                            tie_word_embeddings=False, rope_theta=10000.0)
    hf_config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(hf_config).to(device)
    if args.ac:
        model.gradient_checkpointing_enable()
    model.train()
    wrapped = model
    if dist.get_world_size() > 1:
        ids = [device.index] if device.type == "cuda" else None
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=device.type == "cuda")
    autocast_type = "cuda" if device.type == "cuda" else "cpu"

    def step(tokens):
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(autocast_type, dtype=torch.bfloat16):
            logits = wrapped(input_ids=inputs).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        return loss.detach()

    return step, [model]


BUILDERS = {"glassbox": build_glassbox, "glassbox-core": build_glassbox_core, "torchtitan": build_torchtitan, "transformers": build_transformers}


# ---------------------------------------------------------------------------------------------------- worker


def _init_distributed(device_kind: str):
    import torch
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29512")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    local_rank = int(os.environ["LOCAL_RANK"])
    if device_kind == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return device


def run_worker(args) -> None:
    """One (system, size) on this torchrun rank: build, warm up (compile), time `--steps` steps, print a row."""
    import torch
    import torch.distributed as dist

    device = _init_distributed(args.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    shape = SHAPES[args.size]
    torch.manual_seed(1234 + rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    step, modules = BUILDERS[args.system](shape, device, args)
    # A few distinct batches, made on the device once: no host-to-device copy or sync in the timed loop.
    g = torch.Generator(device=device).manual_seed(99 + rank)
    batches = [torch.randint(0, shape.vocab, (shape.batch, shape.seq + 1), device=device, generator=g)
               for _ in range(4)]

    t0 = time.perf_counter()
    for i in range(args.warmup):
        first_loss = step(batches[i % len(batches)])
    float(first_loss)
    warmup_s = time.perf_counter() - t0

    is_cuda = device.type == "cuda"
    marks = []
    losses = []
    t0 = time.perf_counter()
    for i in range(args.steps):
        if is_cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            marks.append(ev)
        else:
            marks.append(time.perf_counter())
        losses.append(step(batches[i % len(batches)]))
    if is_cuda:
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        marks.append(end)
        torch.cuda.synchronize()
        step_s = [a.elapsed_time(b) / 1e3 for a, b in zip(marks[:-1], marks[1:])]
    else:
        marks.append(time.perf_counter())
        step_s = [b - a for a, b in zip(marks[:-1], marks[1:])]
    wall_s = time.perf_counter() - t0
    final_loss = float(torch.stack(losses)[-1])

    median_s = statistics.median(step_s)
    tokens_per_step = shape.batch * shape.seq
    tps = tokens_per_step / median_s
    flops_per_token = model_config(shape).flops_per_token(shape.seq)
    tps_all = torch.tensor([tps], device=device)
    dist.all_reduce(tps_all, op=dist.ReduceOp.MIN)
    if rank == 0:
        row = {
            "system": args.system, "model": args.size, "gpus": world,
            "params": model_config(shape).num_params(), "non_embedding_params": model_config(shape).num_params(True),
            "batch_per_gpu": shape.batch, "seq_len": shape.seq, "activation_checkpointing": args.ac,
            "compile": args.system != "transformers" and not args.no_compile,
            "median_step_s": median_s, "min_step_s": min(step_s), "max_step_s": max(step_s),
            "mean_step_s_wall": wall_s / args.steps, "warmup_s": warmup_s,
            "tokens_per_s_per_gpu": float(tps_all),
            "flops_per_token": flops_per_token,
            "final_loss": final_loss,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if is_cuda else 0.0,
        }
        print("ROW " + json.dumps(row), flush=True)
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ orchestrator


def measure_matmul_peak() -> float:
    """Median bf16 rate of 8192^3 products on random data, in FLOP/s."""
    import torch

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    times = []
    for _ in range(30):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * n**3 / statistics.median(times)


def prepare_data(max_bytes: int, vocab: int) -> Path:
    """A token store for the full-trainer rows: the Python standard library's text, byte-level BPE of `vocab`
    ids (4096: inside the models' 32000 embedding rows; throughput does not depend on which ids occur)."""
    import tempfile

    from glassbox.data.prepare import prepare

    out = Path(tempfile.mkdtemp(prefix="glassbox_bench_data_")) / "data"
    t0 = time.perf_counter()
    prepare(["stdlib"], out, vocab_size=vocab, max_bytes=max_bytes, progress=False)
    print(f"prepared {out} in {time.perf_counter() - t0:.0f}s", flush=True)
    return out


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def datasheet_peak(name: str) -> float | None:
    from glassbox.train.flops import GPU_BF16_PEAK

    return next((v for k, v in GPU_BF16_PEAK.items() if k in name), None)


def run_one(system: str, size: str, gpus: int, args, visible: str | None = None) -> dict | None:
    """Launch one worker group through torchrun (on GPUs `visible`, default all); return its row, or None
    (printing the log tail) if it failed, ran past --run-timeout, or would start past --budget."""
    if args.budget and time.perf_counter() - STARTED > args.budget:
        print(f"[{system} {size} x{gpus}] skipped: past the --budget of {args.budget:.0f}s", flush=True)
        return None
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
           str(Path(__file__).resolve()), "--worker", "--system", system, "--size", size, "--device", args.device,
           "--steps", str(args.steps), "--warmup", str(args.warmup)]
    cmd += ["--data", args.data] if args.data else []
    cmd += ["--ac"] if args.ac else []
    cmd += ["--no-compile"] if args.no_compile else []
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"), WANDB_MODE="disabled")
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.run_timeout)
    except subprocess.TimeoutExpired as e:
        print(f"[{system} {size} x{gpus}] TIMED OUT after {args.run_timeout:.0f}s", flush=True)
        if args.log_dir:
            Path(args.log_dir).mkdir(parents=True, exist_ok=True)
            Path(args.log_dir, f"{system}_{size}_{gpus}gpu.log").write_text(str(e.stdout or "") + str(e.stderr or ""))
        return None
    log = proc.stdout + proc.stderr
    if args.log_dir:
        Path(args.log_dir).mkdir(parents=True, exist_ok=True)
        Path(args.log_dir, f"{system}_{size}_{gpus}gpu.log").write_text(log)
    rows = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    if proc.returncode != 0 or not rows:
        print(f"[{system} {size} x{gpus}] FAILED rc={proc.returncode} after {time.perf_counter() - t0:.0f}s\n"
              + "\n".join(log.splitlines()[-25:]), flush=True)
        return None
    print(f"[{system} {size} x{gpus}] {rows[0]['tokens_per_s_per_gpu']:.0f} tok/s/GPU, "
          f"{time.perf_counter() - t0:.0f}s", flush=True)
    return rows[0]


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Training throughput and MFU",
        "",
        f"GPU: {meta['gpu']}; datasheet dense bf16 peak {meta['datasheet_peak_tflops']} TFLOP/s; measured bf16 "
        f"matmul peak {meta['measured_matmul_tflops']} TFLOP/s (8192^3). Sequence {meta['seq_len']}, vocab "
        f"{meta['vocab']}, bf16 with fp32 master weights, fused AdamW; median of {meta['steps']} timed steps after "
        f"{meta['warmup']} warm-up steps. MFU = (6 x non-embedding params + 12 x layers x hidden x seq) x tokens/s "
        "/ datasheet peak; `MFU (meas.)` uses the measured matmul peak.",
        "",
        "| model | GPUs | system | batch/GPU | tokens/s/GPU | MFU | MFU (meas.) | vs torchtitan | vs transformers "
        "| step (ms) | peak mem (GiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        def ratio(other: str) -> str:
            ref = next((x for x in rows if x["system"] == other and x["model"] == r["model"]
                        and x["gpus"] == r["gpus"]), None)
            return f"{r['tokens_per_s_per_gpu'] / ref['tokens_per_s_per_gpu']:.2f}x" if ref else "-"

        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        mfu_m = f"{100 * r['mfu_measured_peak']:.1f}%" if r.get("mfu_measured_peak") is not None else "-"
        system = f"{r['system']} ({r['variant']})" if r.get("variant") else r["system"]
        lines.append(f"| {r['model']} | {r['gpus']} | {system} | {r['batch_per_gpu']} | "
                     f"{r['tokens_per_s_per_gpu']:,.0f} | {mfu} | {mfu_m} | {ratio('torchtitan')} | "
                     f"{ratio('transformers')} | {1e3 * r['median_step_s']:.1f} | {r['peak_memory_gib']:.1f} |")
    scaling = meta.get("scaling")
    if scaling:
        lines += ["", "FSDP2 scaling (tokens/s on N GPUs over N x tokens/s on one):", ""]
        lines += [f"- {k}: {100 * v:.1f}%" for k, v in scaling.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--sizes", default="125M,350M,1B")
    p.add_argument("--gpus", default="1", help="comma-separated GPU counts, e.g. 1,2")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=6)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--ac", "--activation-checkpointing", dest="ac", action="store_true",
                   help="activation checkpointing in every system (glassbox: parallel.activation_checkpointing)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--tag", default="", help="a label for this variant, kept in each row")
    p.add_argument("--append", action="store_true", help="keep --out's rows of other variants (tags)")
    p.add_argument("--out", type=Path, default=RESULTS / "train_mfu.json")
    p.add_argument("--concurrent", type=int, default=1, help="run one-GPU jobs on this many GPUs at once")
    p.add_argument("--log-dir", default="")
    p.add_argument("--run-timeout", type=float, default=300, help="seconds one row may take")
    p.add_argument("--budget", type=float, default=0, help="start no new row after this many seconds (0: none)")
    p.add_argument("--data", default="", help="glassbox: a prepared DATA_DIR (default: prepare stdlib text once)")
    p.add_argument("--data-bytes", type=int, default=6_000_000, help="bytes of text when preparing the data")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--system", help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        run_worker(args)
        return

    if "glassbox" in args.systems.split(",") and not args.data:
        vocab = min(4096, *(SHAPES[size].vocab for size in args.sizes.split(",")))
        args.data = str(prepare_data(args.data_bytes, vocab))
    name = gpu_name() if args.device == "cuda" else "cpu"
    peak = datasheet_peak(name) if args.device == "cuda" else None
    measured = measure_matmul_peak() if args.device == "cuda" else None
    print(f"GPU {name}: datasheet {peak}, measured matmul {measured}", flush=True)
    rows: list[dict] = []
    if args.append and args.out.exists():
        rerun = {(system, size, int(g)) for system in args.systems.split(",") for size in args.sizes.split(",")
                 for g in args.gpus.split(",")}
        rows = [r for r in json.loads(args.out.read_text())
                if (r["system"], r["model"], r["gpus"]) not in rerun or r.get("variant", "") != args.tag]
    lock = threading.Lock()

    def finish(row: dict | None) -> None:
        if row is None:
            return
        achieved = row["flops_per_token"] * row["tokens_per_s_per_gpu"]
        row.update(gpu=name, variant=args.tag, mfu=achieved / peak if peak else None,
                   mfu_measured_peak=achieved / measured if measured else None)
        with lock:
            rows.append(row)
            rows.sort(key=lambda r: (r["gpus"], list(SHAPES).index(r["model"]), r["system"], r["variant"]))
            write_results(rows, args, name, peak, measured)

    jobs = [(system, size, gpus) for gpus in [int(g) for g in args.gpus.split(",")]
            for size in args.sizes.split(",") for system in args.systems.split(",")]
    single = [j for j in jobs if j[2] == 1]
    if args.concurrent > 1 and single:
        # One-GPU jobs side by side, each alone on its own GPU (the host's CPUs are shared; timed steps are
        # GPU-bound and take no host sync).
        free = [str(i) for i in range(args.concurrent)]
        with ThreadPoolExecutor(args.concurrent) as pool:
            def on_gpu(job):
                with lock:
                    gpu = free.pop()
                try:
                    finish(run_one(*job, args, visible=gpu))
                finally:
                    with lock:
                        free.append(gpu)
            list(pool.map(on_gpu, single))
        jobs = [j for j in jobs if j[2] != 1]
    for job in jobs:
        finish(run_one(*job, args))
    write_results(rows, args, name, peak, measured)
    print(markdown(rows, _meta(rows, args, name, peak, measured)), flush=True)


def _meta(rows, args, name, peak, measured) -> dict:
    shape = SHAPES[args.sizes.split(",")[0]]
    scaling = {}
    for r in rows:
        if r["gpus"] > 1:
            one = next((x for x in rows if x["gpus"] == 1 and x["system"] == r["system"]
                        and x["model"] == r["model"]), None)
            if one:
                scaling[f"{r['system']} {r['model']} x{r['gpus']}"] = (
                    r["tokens_per_s_per_gpu"] / one["tokens_per_s_per_gpu"])
    return {"gpu": name, "datasheet_peak_tflops": peak and round(peak / 1e12),
            "measured_matmul_tflops": measured and round(measured / 1e12), "seq_len": shape.seq,
            "vocab": shape.vocab, "steps": args.steps, "warmup": args.warmup, "scaling": scaling}


def write_results(rows, args, name, peak, measured) -> None:
    from glassbox.atomic import write_bytes, write_json

    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, rows)
    write_bytes(args.out.with_suffix(".md"), markdown(rows, _meta(rows, args, name, peak, measured)).encode())


if __name__ == "__main__":
    main()
