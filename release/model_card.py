"""The model card (model repo README.md) and dataset card, with the Hub's YAML metadata block.

Everything on the card comes from the run (config, manifest, metrics) and the release build, never from the
clock, so rebuilding a release gives the same card. The Hub reads the YAML header for the license, language,
tags, linked datasets and the `model-index` results it shows in the widget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import yaml


@dataclass
class BranchRow:
    branch: str
    step: int
    tokens: int
    val_loss: float


@dataclass
class CardFacts:
    """What the cards say; gathered by the release build from the run directory."""

    name: str
    repo_id: str
    dataset_repo_id: str
    license: str
    language: list[str]
    architecture: str                      # "LlamaForCausalLM" or "MixtralForCausalLM"
    model: dict[str, Any]                  # the run config's model section
    num_params: int
    hyperparameters: dict[str, Any]        # optimizer, schedule, batch, seeds: flattened "section.key" -> value
    data_sources: list[str]
    data_fingerprint: str
    tokenizer_vocab: int
    seq_len: int
    tokens: int
    steps: int
    train_flops: float
    compute: dict[str, Any]                # hardware, world sizes, wall time, as the run recorded them
    branches: list[BranchRow]
    main_branch: str
    val_samples: int
    reproduce_commands: list[str]
    analysis: dict[str, Any] | None = None  # set by `glassbox release analyze`: summary rows and plot names
    data_meta: dict[str, Any] = field(default_factory=dict)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"


def _front_matter(meta: dict[str, Any]) -> str:
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def model_card(f: CardFacts) -> str:
    final = next(b for b in f.branches if b.branch == f.main_branch)
    final_ppl = math.exp(final.val_loss)
    family = "mixtral" if f.architecture.startswith("Mixtral") else "llama"
    meta = {
        "license": f.license,
        "language": f.language,
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["glassbox", "llm360", "open-data", "intermediate-checkpoints", family, "text-generation"],
        "datasets": [f.dataset_repo_id],
        "model-index": [{
            "name": f.name,
            "results": [{
                "task": {"type": "text-generation", "name": "Text Generation"},
                "dataset": {"type": f.dataset_repo_id, "name": f"{f.name} validation split", "split": "valid"},
                "metrics": [
                    {"type": "loss", "name": "Validation loss", "value": round(final.val_loss, 6)},
                    {"type": "perplexity", "name": "Validation perplexity", "value": round(final_ppl, 6)},
                ],
            }],
        }],
    }
    first_branch = f.branches[0].branch
    out = [_front_matter(meta)]
    out.append(f"# {f.name}\n")
    out.append(
        f"A {_human(f.num_params)}-parameter {f.architecture} trained with glassbox for {f.steps} steps on "
        f"{_human(f.tokens)} tokens, released LLM360-style: the final model on `main`, every checkpoint as a "
        f"branch, the training data in the order it was seen ([{f.dataset_repo_id}]"
        f"(https://huggingface.co/datasets/{f.dataset_repo_id})), the metrics, and the exact config and commands "
        "to reproduce any step.\n"
    )
    out.append("## Architecture\n")
    out.append(_table(["field", "value"], [["architecture", f.architecture], ["parameters", f.num_params]]
                      + [[k, v] for k, v in f.model.items()]) + "\n")
    out.append("## Training hyperparameters\n")
    out.append(_table(["setting", "value"], [[k, v] for k, v in f.hyperparameters.items()]) + "\n")
    out.append("## Data\n")
    rows = [["sources", f.data_sources], ["fingerprint", f"`{f.data_fingerprint}`"],
            ["tokenizer vocabulary", f.tokenizer_vocab], ["sequence length", f.seq_len],
            ["training tokens", f.tokens]]
    rows += [[f"meta.{k}", v] for k, v in sorted(f.data_meta.items())]
    out.append(_table(["field", "value"], rows) + "\n")
    out.append(
        "The dataset repository holds the token store, the training data cut into chunks (one per checkpoint, "
        "in training order), the sample-order index, the per-step data-order log, `meta.json` and the tokenizer.\n"
    )
    out.append("## Tokens and compute\n")
    rows = [["tokens", f.tokens], ["optimizer steps", f.steps],
            ["training FLOPs (6N + attention, estimate)", f"{f.train_flops:.4g}"]]
    rows += [[k, v] for k, v in f.compute.items()]
    out.append(_table(["quantity", "value"], rows) + "\n")
    out.append("## Loss curve\n")
    out.append("![training loss](loss_curve.png)\n")
    out.append("Per-step metrics are in `metrics/metrics.jsonl`.\n")
    out.append("## Checkpoints\n")
    out.append(
        f"Every checkpoint is a branch named `step` + the step zero-padded to 8 digits, so branch names sort by "
        f"step. `main` is the final model (`{f.main_branch}`). Validation loss is the mean next-token loss on the "
        f"first {f.val_samples} samples of the validation split.\n"
    )
    out.append(_table(["branch", "step", "tokens", "validation loss"],
                      [[f"`{b.branch}`", b.step, b.tokens, round(b.val_loss, 6)] for b in f.branches]) + "\n")
    out.append("## How to load\n")
    out.append(
        "```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'tokenizer = AutoTokenizer.from_pretrained("{f.repo_id}")\n'
        f'model = AutoModelForCausalLM.from_pretrained("{f.repo_id}")  # final model\n'
        f'early = AutoModelForCausalLM.from_pretrained("{f.repo_id}", revision="{first_branch}")  # any checkpoint\n'
        "```\n"
    )
    out.append(
        "Each branch also carries `training_state/`, the raw training checkpoint (weights, optimizer, sampler "
        "cursor, RNG), so training can resume from it or replay any step.\n"
    )
    out.append("## How to reproduce\n")
    out.append("The resolved config is `reproduce/config.yaml`; the run's manifest (code version, data fingerprint, "
               "hardware) is `reproduce/run_manifest.json`.\n")
    out.append("```bash\n" + "\n".join(f.reproduce_commands) + "\n```\n")
    out.append(
        "`glassbox reproduce` loads the checkpoint before step N, replays the logged data order up to N and "
        "compares with checkpoint N: `bit-exact` on the same hardware and world layout, otherwise the largest "
        "weight difference and the loss difference.\n"
    )
    if f.analysis:
        out.append("## Analyses\n")
        out.append(
            f"Computed per checkpoint by `glassbox release analyze` (arrays in `analysis/analysis.zarr`): "
            f"validation perplexity on {f.analysis['val_samples']} samples; memorization score = fraction of "
            f"{f.analysis['continuation_len']} greedy continuation tokens that match the training data, given "
            f"{f.analysis['prompt_len']}-token prompts ({f.analysis['num_prompts']} prompts drawn from the "
            "released chunks); L2 norm of each layer's weights.\n"
        )
        out.append(_table(["branch", "step", "validation perplexity", "memorization score"],
                          [[f"`{r['branch']}`", r["step"], round(r["perplexity"], 6), round(r["memorization"], 6)]
                           for r in f.analysis["rows"]]) + "\n")
        out.append("\n".join(f"![{name}](analysis/{name})" for name in f.analysis["plots"]) + "\n")
    out.append("## Verifying this release\n")
    out.append(
        "The release manifest lists the sha256 of every file; `glassbox release verify RELEASE_DIR` checks them, "
        "loads every branch with transformers offline and compares each checkpoint's logits on a fixed probe "
        "with the values recorded at build time.\n"
    )
    return "\n".join(out)


def dataset_card(f: CardFacts, chunk_rows: list[list[Any]]) -> str:
    meta = {
        "license": f.license,
        "language": f.language,
        "tags": ["glassbox", "llm360", "pretraining-data", "data-order"],
        "pretty_name": f"{f.name} training data",
    }
    out = [_front_matter(meta)]
    out.append(f"# {f.name}: training data in training order\n")
    out.append(f"The data [{f.repo_id}](https://huggingface.co/{f.repo_id}) was trained on. "
               f"Fingerprint `{f.data_fingerprint}`; sequence length {f.seq_len}; {f.tokens} training tokens.\n")
    out.append("## Contents\n")
    out.append(_table(["path", "what"], [
        ["`store/`", "the prepared token store (megatron IndexedDataset `.bin/.idx`, `meta.json`, `tokenizer.json`)"],
        ["`store/` index files", "the sample-order index (document, sample and shuffle indices) the sampler built"],
        ["`chunks/`", "every training sample in training order, one `.npy` per checkpoint interval "
                      f"(shape [samples, {f.seq_len + 1}])"],
        ["`data_order.zarr`", "per step: cursor start, batch size, sha256 of the batch's token ids"],
        ["`meta.json`, `tokenizer.json`", "the store's metadata and the tokenizer"],
    ]) + "\n")
    out.append("## Chunks\n")
    out.append(_table(["chunk", "steps", "samples", "first sample"], chunk_rows) + "\n")
    out.append("Rebuild the batch of any step with `glassbox data batch --run RUN_DIR --step N`.\n")
    return "\n".join(out)
