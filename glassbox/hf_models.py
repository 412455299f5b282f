"""Model types glassbox adds to transformers (SwiftKV), registered as soon as transformers is imported.

`AutoModelForCausalLM.from_pretrained` must load a SwiftKV directory after `import glassbox`, without
`trust_remote_code`; transformers' registration API needs the classes, and they subclass transformers' Llama.
Importing transformers on `import glassbox` would cost every command line call seconds, so `install()` registers
right away only when transformers is loaded already, and otherwise puts a finder on `sys.meta_path` that runs the
registration right after transformers' own package module has executed. The registrars are named by string,
like the command line's areas, so the root package depends on no area.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

# Modules that add their classes to transformers' Auto mappings when imported (each ends by registering, so
# one imported first, which imports transformers on its way, registers itself once it is complete).
REGISTRARS = ["glassbox.checkpoints.hf_swiftkv"]


def register_all() -> None:
    for name in REGISTRARS:
        try:
            importlib.import_module(name)
        except Exception as e:   # a broken registrar must not break `import transformers`
            warnings.warn(f"glassbox: could not register {name} with transformers: {e}", stacklevel=2)


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        self.inner.exec_module(module)
        register_all()


class _AfterTransformersImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)      # once: the other finders locate the real package
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


def install() -> None:
    if "transformers" in sys.modules:
        register_all()
    elif not any(isinstance(f, _AfterTransformersImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTransformersImport())
