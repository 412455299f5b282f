"""glassbox: open LLM training with full artifact release.

The import package joins the repository's top-level areas (train, data, checkpoints, fault_tolerance, elastic,
inference, release) as subpackages; this root holds the command line, config loading and shared utilities.
"""

__version__ = "0.1.0"

# glassbox's own transformers model types (the per-layer-expert MoE, SwiftKV) load through transformers' Auto classes
# once glassbox is imported.
from glassbox import hf_models as _hf_models  # noqa: E402

_hf_models.install()
