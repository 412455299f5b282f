"""Registers glassbox's own transformers model type (`glassbox_moe`) with transformers' Auto classes.

`import glassbox` calls `install()`. Registering needs transformers' modeling code, whose import costs seconds,
and most glassbox commands never touch transformers; so registration waits until transformers' Auto modules are
loaded, and runs at once if they are already. It cannot run inside a transformers import: importing Mixtral's
modules while, say, `modeling_utils` is half-executed fails on the circular import. So a finder on
`sys.meta_path` wraps the loading of every `transformers` module and registers when the outermost one has
finished executing. Either way, once glassbox is imported, `AutoConfig` and `AutoModelForCausalLM` know the type,
with no trust_remote_code.
"""

from __future__ import annotations

import importlib.abc
import sys

_CONFIG_AUTO = "transformers.models.auto.configuration_auto"
_MODELING_AUTO = "transformers.models.auto.modeling_auto"


def register_config() -> None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING, AutoConfig

    from glassbox.models.hf_moe_config import MODEL_TYPE, GlassboxMoeConfig

    if MODEL_TYPE not in CONFIG_MAPPING:
        AutoConfig.register(MODEL_TYPE, GlassboxMoeConfig)


def register_model() -> None:
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )
    from transformers.models.auto.modeling_auto import AutoModelForCausalLM

    from glassbox.models.hf_moe import GlassboxMoeConfig, GlassboxMoeForCausalLM
    from glassbox.models.hf_moe_config import MODEL_TYPE

    AutoModelForCausalLM.register(GlassboxMoeConfig, GlassboxMoeForCausalLM, exist_ok=True)
    # The on-disk layout is Mixtral's (one tensor per expert); transformers fuses it in memory by model type.
    register_checkpoint_conversion_mapping(MODEL_TYPE, get_checkpoint_conversion_mapping("mixtral"), overwrite=True)


class _RegisterAfterTransformersImports(importlib.abc.MetaPathFinder):
    """Wraps each transformers module's loader; when the outermost finishes executing, registers what the loaded
    Auto modules allow, and leaves `sys.meta_path` once both registrations are done."""

    def __init__(self) -> None:
        self.pending = {_CONFIG_AUTO: register_config, _MODELING_AUTO: register_model}
        self.depth = 0
        self.registering = False

    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers" and not fullname.startswith("transformers."):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            self.depth += 1
            try:
                exec_module(module)
            finally:
                self.depth -= 1
            if self.depth == 0:
                self.register_loaded()

        spec.loader.exec_module = exec_then_register
        return spec

    def register_loaded(self) -> None:
        if self.registering:
            return
        self.registering = True
        try:
            for name in list(self.pending):
                if name in sys.modules:
                    self.pending.pop(name)()
        finally:
            self.registering = False
        if not self.pending and self in sys.meta_path:
            sys.meta_path.remove(self)


def install() -> None:
    """Register now what transformers' loaded Auto modules allow; the rest as soon as they load."""
    if any(isinstance(f, _RegisterAfterTransformersImports) for f in sys.meta_path):
        return
    finder = _RegisterAfterTransformersImports()
    finder.register_loaded()
    if finder.pending:
        sys.meta_path.insert(0, finder)
