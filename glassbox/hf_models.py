"""Model types glassbox adds to transformers: the per-layer-expert MoE (`glassbox_moe`) and SwiftKV.

After `import glassbox`, `AutoConfig` and `AutoModelForCausalLM` load such directories with no
trust_remote_code. Registering needs transformers' modeling code, whose import costs seconds, and most glassbox
commands never touch transformers; so `install()` registers at once only what transformers' loaded Auto modules
allow, and otherwise puts a finder on `sys.meta_path` that wraps the loading of every transformers module and
registers when the outermost one has finished executing. It cannot register inside a transformers import:
importing Mixtral's modules while, say, `modeling_utils` is half-executed fails on the circular import.
Registrars are named by string ("module:function"), like the command line's areas, so the root package depends
on no area.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import warnings

# Per transformers Auto module: what to run once it is loaded. SwiftKV registers its config and model together
# (its config subclasses Llama's, which needs no Auto module of its own).
REGISTRARS: dict[str, list[str]] = {
    "transformers.models.auto.configuration_auto": ["glassbox.models.hf_registry:register_config",
                                                     "glassbox.checkpoints.hf_swiftkv:register"],
    "transformers.models.auto.modeling_auto": ["glassbox.models.hf_registry:register_model"],
}


def run_registrar(target: str) -> None:
    """Run one "module:function" registrar. A module still being imported (it imported transformers, whose
    import triggered this) is skipped: such a module ends by registering itself."""
    module_name, function = target.split(":")
    partial = sys.modules.get(module_name)
    if partial is not None and getattr(getattr(partial, "__spec__", None), "_initializing", False):
        return
    try:
        getattr(importlib.import_module(module_name), function)()
    except Exception as e:   # a broken registrar must not break `import transformers`
        warnings.warn(f"glassbox: could not register {target} with transformers: {e}", stacklevel=2)


class _RegisterAfterTransformersImports(importlib.abc.MetaPathFinder):
    """Wraps each transformers module's loader; when the outermost finishes executing, registers what the loaded
    Auto modules allow, and leaves `sys.meta_path` once every registration is done."""

    def __init__(self) -> None:
        self.pending = dict(REGISTRARS)
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
                    for target in self.pending.pop(name):
                        run_registrar(target)
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
