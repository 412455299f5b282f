"""Write a pruned model as a Hugging Face directory beside what its source directory carried.

The weights and config come from `save_hf_model_dir` (Mixtral or glassbox_moe by the per-layer counts); the
source's tokenizer files, chat template and generation config are copied as they were, so the pruned model
tokenises and stops exactly like the original; `pruning.json` records what was pruned and how. All of it is
built aside and renamed into place, so `out` is never half-written.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from glassbox.atomic import staged_dir, write_json
from glassbox.checkpoints.hf_format import save_hf_model_dir
from glassbox.errors import GlassboxError
from glassbox.models.transformer import Transformer

_CARRIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
            "generation_config.json")
REPORT = "pruning.json"


def write_pruned_dir(model: Transformer, source: Path, out: Path, report: dict) -> Path:
    source, out = Path(source), Path(out)
    if out.resolve() == source.resolve():
        raise GlassboxError(f"--out {out} is the source model directory; write the pruned model elsewhere")
    if out.exists() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise GlassboxError(f"{out} exists and is not a model directory; choose an empty or new --out")
    with staged_dir(out, replace=True) as tmp:
        save_hf_model_dir(model, tmp)
        for name in _CARRIED:
            if (source / name).is_file():
                shutil.copyfile(source / name, tmp / name)
        write_json(tmp / REPORT, {"source": str(source), **report})
    return out
