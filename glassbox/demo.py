"""`glassbox demo`: the main job end to end on bundled defaults, on a CPU in a few minutes.

Prepares the standard-library corpus, trains the `tiny` config (saving checkpoints along the way), prints a
greedy sample, exports the final checkpoint to Hugging Face format, builds and verifies a release of the run,
and serves the export for one completion through the OpenAI API. Each stage is the code path its own command
uses, so the demo doubles as a smoke test of the whole pipeline.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

DEMO_PROMPT = "def __init__(self"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main job on bundled defaults (prepare, train, export, release, serve)")
    p.add_argument("--out", default="demo", help="folder for everything the demo writes (default: ./demo)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the tiny config's)")
    p.set_defaults(handler=run)


def _stage(text: str) -> None:
    print(f"\n[demo] {text}", flush=True)


def run(args: argparse.Namespace) -> int:
    from glassbox.checkpoints.export import export_checkpoint
    from glassbox.checkpoints.layout import checkpoints_root, list_checkpoints
    from glassbox.data.prepare import prepare, prepare_cli_summary
    from glassbox.release.build import BuildOptions, build_release
    from glassbox.release.verify import format_report, verify_release
    from glassbox.train.cli import resolve_config_path, summary
    from glassbox.train.config import load_run_config
    from glassbox.train.generate import greedy_sample
    from glassbox.train.trainer import Trainer

    out = Path(args.out)
    data_dir, run_dir, hf_dir, release_dir = out / "data", out / "runs" / "tiny", out / "hf", out / "release"
    # The token store is reused (a second prepare is a no-op); the run and what derives from it start afresh.
    for stale in (run_dir, hf_dir, release_dir):
        if stale.exists():
            print(f"[demo] removing the previous demo's {stale}")
            shutil.rmtree(stale)

    _stage(f"1/5 preparing the standard-library corpus into {data_dir}")
    print(prepare_cli_summary(prepare(["stdlib"], data_dir, vocab_size=4096)))

    _stage(f"2/5 training configs/tiny.yaml on the CPU into {run_dir}")
    overrides = [f"data.path={json.dumps(str(data_dir))}", f"run_dir={json.dumps(str(run_dir))}",
                 "checkpoint.every=100", "checkpoint.log_spaced=true"]
    if args.steps:
        overrides.append(f"schedule.steps={args.steps}")
    cfg = load_run_config(resolve_config_path("tiny"), overrides)
    state = Trainer(cfg).fit()
    print(summary(state))
    sample = greedy_sample(state.model, data_dir / "tokenizer.json", DEMO_PROMPT, max_new_tokens=40)
    print(f"greedy sample:\n---\n{sample}\n---")

    _stage(f"3/5 exporting the final checkpoint to Hugging Face format in {hf_dir}")
    step, last = list_checkpoints(checkpoints_root(run_dir))[-1]
    export_checkpoint(last, hf_dir)
    print(f"exported step {step} -> {hf_dir} (load it with transformers.AutoModelForCausalLM.from_pretrained)")

    _stage(f"4/5 building and verifying a release of the run in {release_dir}")
    build_release(run_dir, release_dir, BuildOptions(force=True))
    report = verify_release(release_dir)
    print(format_report(report))
    if not report.ok:
        return 1

    _stage("5/5 serving the export and asking for a completion through the OpenAI API")
    completion = _serve_and_complete(hf_dir)
    print(f"completion for {DEMO_PROMPT!r}: {completion!r}")
    print(f"\n[demo] done: everything is under {out}/")
    return 0


def _serve_and_complete(model_dir: Path) -> str:
    import openai

    from glassbox.inference.engine import EngineConfig, LLMEngine
    from glassbox.inference.server import running_server

    engine = LLMEngine.from_model_dir(str(model_dir), EngineConfig())
    with running_server(engine, "glassbox-demo") as base_url:
        print(f"serving {model_dir} at {base_url}/v1")
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused")
        response = client.completions.create(model="glassbox-demo", prompt=DEMO_PROMPT, max_tokens=32,
                                             temperature=0)
    return response.choices[0].text
