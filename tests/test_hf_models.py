"""glassbox's transformers model types are known to the Auto classes after `import glassbox`, whatever the order
of imports: each order runs in a fresh interpreter, since registration happens once per process (the suite's own
process imports transformers first, the other order)."""

import subprocess
import sys

import pytest

CHECK = """
from transformers import AutoConfig, AutoModelForCausalLM
for model_type in ("glassbox_moe", "glassbox_swiftkv"):
    config = AutoConfig.for_model(model_type)
    model_class = AutoModelForCausalLM._model_mapping[type(config)]
    print(model_type, type(config).__name__, model_class.__name__)
"""


@pytest.mark.parametrize("first", [
    "import glassbox",                              # before transformers: the finder registers after its import
    "import glassbox.checkpoints.hf_swiftkv",       # a registrar imported first imports transformers itself
])
def test_model_types_registered_in_any_import_order(first):
    out = subprocess.run([sys.executable, "-W", "error::UserWarning:glassbox.hf_models", "-c", first + "\n" + CHECK],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split("\n")
    assert any(line.startswith("glassbox_moe GlassboxMoeConfig GlassboxMoeForCausalLM") for line in lines), out.stdout
    assert any(line.startswith("glassbox_swiftkv ") for line in lines), out.stdout
