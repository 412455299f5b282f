"""The tokenizer: a byte-level BPE trained with Hugging Face `tokenizers`, or a given `tokenizer.json`.

Byte-level BPE never meets an unknown character (every byte is in the base alphabet), so any corpus encodes, and
the saved `tokenizer.json` loads in transformers (`PreTrainedTokenizerFast(tokenizer_file=...)`) as-is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from glassbox.errors import GlassboxError

EOT = "<|endoftext|>"
# End-of-text spellings accepted in a user-supplied tokenizer.json, in order of preference.
EOT_CANDIDATES = (EOT, "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>")
BYTE_ALPHABET = 256
MIN_VOCAB = BYTE_ALPHABET + 1  # every byte plus the end-of-text token


def check_vocab_size(vocab_size: int) -> None:
    """A byte-level BPE needs every byte plus end-of-text; anything smaller is an error naming the flag."""
    if vocab_size < MIN_VOCAB:
        raise GlassboxError(
            f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at least {MIN_VOCAB} "
            f"({BYTE_ALPHABET} byte tokens + {EOT})"
        )


def train_bpe(texts: Iterable[str], count: int, vocab_size: int, progress: bool = False):
    """Train a byte-level BPE of `vocab_size` ids (end-of-text is id 0) on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    check_vocab_size(vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tok.train_from_iterator(texts, trainer, length=count)
    return tok


def load_tokenizer(path: Path):
    """Load a tokenizer.json, with a one-line error naming the file when it is missing or unreadable."""
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise GlassboxError(f"tokenizer {path}: no such file")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
        raise GlassboxError(f"tokenizer {path}: cannot load ({str(e).splitlines()[0]})") from None


def eot_token(tok, where: str) -> tuple[str, int]:
    """The tokenizer's end-of-text token and id; documents are separated by it in the token store."""
    for name in EOT_CANDIDATES:
        tid = tok.token_to_id(name)
        if tid is not None:
            return name, tid
    raise GlassboxError(f"tokenizer {where}: no end-of-text token (looked for {', '.join(EOT_CANDIDATES)})")
