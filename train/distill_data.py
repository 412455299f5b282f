"""The data of a SwiftKV distillation: prompts from an offline source, answered by the teacher through glassbox's
engine, tokenized by the ordinary data pipeline with the model's own tokenizer.

Each prompt is rendered as a one-turn chat (the model directory's chat template, or the engine's plain default)
up to the generation prompt, the text that opens the assistant's turn; the teacher (the base model) continues it,
and the document is rendered prompt + response. That generation prompt is the distillation's `response_marker`:
the loss counts the tokens after it. The documents are written as JSONL beside DATA_DIR (`DATA_DIR.teacher.jsonl`,
kept: it is the run's data source) and prepared into DATA_DIR like any corpus, so the data order, fingerprint
and tokenizer check of an ordinary run apply.
"""

from __future__ import annotations

import ast
import json
import random
import sysconfig
import textwrap
from dataclasses import dataclass
from pathlib import Path

from glassbox.atomic import write_text
from glassbox.errors import GlassboxError

# Standard-library modules whose functions make the offline prompts (fixed, so the prompt set is reproducible).
STDLIB_MODULES = ("textwrap.py", "string.py", "shlex.py", "glob.py", "fnmatch.py", "heapq.py", "bisect.py",
                  "colorsys.py", "calendar.py", "difflib.py", "statistics.py", "fractions.py", "argparse.py",
                  "csv.py", "random.py", "functools.py", "pathlib.py", "inspect.py", "tokenize.py", "ast.py",
                  "dataclasses.py", "pprint.py", "copy.py", "base64.py", "gettext.py", "ipaddress.py",
                  "shutil.py", "tarfile.py", "zipfile.py", "configparser.py", "datetime.py", "decimal.py",
                  "_pydecimal.py", "enum.py", "typing.py", "subprocess.py", "threading.py", "logging/__init__.py",
                  "email/utils.py", "json/encoder.py", "json/decoder.py", "urllib/parse.py", "http/cookies.py")
MAX_FUNCTION_LINES = 30


@dataclass
class TeacherData:
    data_dir: Path
    documents: Path                 # the JSONL of rendered prompt + response documents
    response_marker: str            # the text opening every response (distill.response_marker)
    num_documents: int
    response_tokens: int


def stdlib_prompts(count: int, seed: int = 0) -> list[str]:
    """`count` prompts asking to explain a Python standard-library function, drawn from STDLIB_MODULES."""
    root = Path(sysconfig.get_paths()["stdlib"])
    functions = []
    for name in STDLIB_MODULES:
        path = root / name
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()      # sliced per function (ast.get_source_segment re-splits the file each call)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno < MAX_FUNCTION_LINES:
                functions.append(textwrap.dedent("\n".join(lines[node.lineno - 1:node.end_lineno])))
    if not functions:
        raise GlassboxError(f"no functions found in the standard library at {root}")
    rng = random.Random(seed)
    picked = rng.sample(functions, min(count, len(functions)))
    return [f"Explain briefly what this Python function does:\n\n{src}" for src in picked]


def read_prompts(path: Path) -> list[str]:
    """Prompts from a .jsonl file (`prompt` or `text` field per line) or a text file (one per non-empty line)."""
    path = Path(path)
    if not path.is_file():
        raise GlassboxError(f"--prompts {path}: no such file")
    if path.suffix == ".jsonl":
        prompts = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            record = json.loads(line)
            text = record.get("prompt", record.get("text")) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise GlassboxError(f"{path}:{i}: expected an object with a 'prompt' (or 'text') string")
            prompts.append(text)
        return prompts
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def generation_prompt(tokenizer) -> str:
    """The text the chat template adds to open the assistant's turn (the response marker)."""
    messages = [{"role": "user", "content": "x"}]
    with_prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    without = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    if not with_prompt.startswith(without) or with_prompt == without:
        raise GlassboxError("the chat template's generation prompt is not a suffix of the conversation; cannot "
                            "mark where responses start")
    return with_prompt[len(without):]


def transcript(tokenizer, prompt: str, rendered_prompt: str, response: str) -> str:
    """The whole turn as the chat template writes it (the response closed by the template's end-of-turn, e.g.
    SmolLM2's <|im_end|>), when that begins with the rendered prompt; else the rendered prompt + response."""
    turn = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                          {"role": "assistant", "content": response}], add_generation_prompt=False)
    return turn if turn.startswith(rendered_prompt + response) else rendered_prompt + response


def generate_teacher_data(model_dir: Path, prompts: list[str], out: Path, *, max_new_tokens: int = 128,
                          engine_options: dict | None = None, valid_fraction: float = 0.1,
                          progress: bool = False) -> TeacherData:
    """Answer `prompts` with the model at `model_dir` (greedy, the engine's batching) and prepare the documents
    into DATA_DIR `out` with the model's tokenizer."""
    from glassbox.data.prepare import prepare
    from glassbox.inference.engine import EngineConfig, LLMEngine
    from glassbox.inference.llm import LLM
    from glassbox.inference.sampling_params import SamplingParams

    model_dir, out = Path(model_dir), Path(out)
    if not prompts:
        raise GlassboxError("no prompts to answer")
    if not (model_dir / "tokenizer.json").is_file():
        raise GlassboxError(f"{model_dir} has no tokenizer.json: the teacher's data is tokenized with it")
    llm = LLM(engine=LLMEngine.from_model_dir(model_dir, EngineConfig(**(engine_options or {}))))
    tok = llm.tokenizer
    marker = generation_prompt(tok)
    rendered = [(p, tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True))
                for p in prompts]
    # Prompts too long to leave room for a whole response are left out (counted in num_documents).
    limit = llm.engine.max_model_len - max_new_tokens
    kept = [(p, r, ids) for p, r in rendered if len(ids := tok.encode(r)) <= limit]
    if not kept:
        raise GlassboxError(f"every prompt is longer than {limit} tokens (the context less --max-new-tokens)")
    outputs = llm.generate([ids for _, _, ids in kept], SamplingParams(temperature=0, max_tokens=max_new_tokens),
                           use_tqdm=progress)
    docs = []
    tokens = 0
    for (prompt, text, _), o in zip(kept, outputs):
        response = o.outputs[0].token_ids
        tokens += len(response)
        docs.append(json.dumps({"text": transcript(tok, prompt, text, tok.decode(response))}))
    documents = out.with_name(out.name + ".teacher.jsonl")
    documents.parent.mkdir(parents=True, exist_ok=True)
    write_text(documents, "\n".join(docs) + "\n")
    prepare([str(documents)], out, tokenizer=model_dir / "tokenizer.json", valid_fraction=valid_fraction,
            progress=progress)
    return TeacherData(out, documents, marker, len(docs), tokens)
