"""The `data:` section of a run config: which token store(s) to read and how to cut them into samples."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from glassbox.config import ConfigError


@dataclass
class BlendSource:
    path: str                   # a prepared DATA_DIR
    weight: float = 1.0


@dataclass
class DataConfig:
    path: str = ""                                          # one prepared DATA_DIR (or use `blend`)
    blend: list[BlendSource] = field(default_factory=list)  # several DATA_DIRs sampled by weight
    seq_len: int = 256                                      # tokens per sample (each sample holds seq_len + 1 ids)
    seed: int = 1234                                        # seed of the global sample order
    verify: bool = True      # check the token files' chunk hashes as they are read (off: recorded in the manifest)

    def dirs(self) -> list[Path]:
        """The prepared DATA_DIRs a run reads: `path`, or each source of `blend` in order."""
        return [Path(self.path)] if self.path else [Path(src.path) for src in self.blend]

    def validate(self) -> None:
        if bool(self.path) == bool(self.blend):
            raise ConfigError("data: set exactly one of data.path or data.blend")
        if self.seq_len <= 0:
            raise ConfigError(f"data.seq_len: must be positive, got {self.seq_len}")
        for i, src in enumerate(self.blend):
            if not src.weight > 0:     # NaN fails too
                raise ConfigError(f"data.blend[{i}].weight: must be positive, got {src.weight}")
