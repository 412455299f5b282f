"""Text in and out: the model directory's tokenizer, incremental detokenisation, and chat templates.

The engine reads `tokenizer.json` with Hugging Face `tokenizers` directly (what transformers' fast tokenizer
wraps), and `tokenizer_config.json` for the chat template and special tokens. A model directory without a chat
template gets DEFAULT_CHAT_TEMPLATE, a plain-text one that needs no special tokens, so any base model can chat.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from glassbox.errors import GlassboxError

# One line of role header per message, then the content; generation starts after an "assistant:" header.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class Tokenizer:
    def __init__(self, model_dir: Path):
        from glassbox.data.tokenizer import load_tokenizer

        model_dir = Path(model_dir)
        self._tok = load_tokenizer(model_dir / "tokenizer.json")
        config_path = model_dir / "tokenizer_config.json"
        self.config: dict[str, Any] = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template = self.config.get("chat_template")
        if isinstance(template, list):
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_template: str = template or DEFAULT_CHAT_TEMPLATE
        self._compiled = None

    def _special(self, name: str) -> str | None:
        value = self.config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        return value

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id(self._special("eos_token"))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=True).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of each text, in one call that releases the GIL (a long prompt tokenized on a worker thread
        then leaves the server's event loop running; `encode` holds the GIL for the whole call)."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=True)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def fingerprint(self) -> str:
        """sha256 of the tokenizer's full serialisation (vocabulary, merges, normalisation, special tokens): what
        must match for token ids from one tokenizer to mean the same to a model trained on another (the LTR
        ranker checks it against the served model's)."""
        import hashlib

        return hashlib.sha256(self._tok.to_str().encode()).hexdigest()

    def token_text(self, token_id: int) -> str:
        """The text of one token on its own (for logprob listings)."""
        return self._tok.decode([token_id], skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if self._compiled is None:
            def raise_exception(message: str) -> None:
                raise GlassboxError(f"chat template: {message}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            try:
                self._compiled = env.from_string(self.chat_template)
            except jinja2.TemplateError as e:
                raise GlassboxError(f"chat template does not compile: {e}") from None
        try:
            return self._compiled.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._special("bos_token") or "",
                eos_token=self._special("eos_token") or "",
            )
        except jinja2.TemplateError as e:
            raise GlassboxError(f"chat template failed: {e}") from None


class IncrementalDetokenizer:
    """Decodes a growing token list into text deltas without ever emitting half a UTF-8 character.

    Byte-level tokens can end mid-character; decoding then yields U+FFFD. The text is re-decoded from a few tokens
    back (`prefix`) so context-dependent decoders stay right, and a delta is released only when it does not end in
    a replacement character.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-4:])
        self.prefix = 0
        self.read = len(self.ids)
        self.text = ""

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            delta = after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
            self.text += delta
            return delta
        return ""
