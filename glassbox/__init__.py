"""glassbox: open LLM training with full artifact release.

The import package joins the repository's top-level areas (train, data, checkpoints, fault_tolerance, elastic,
inference, release) as subpackages; this root holds the command line, config loading and shared utilities.
"""

__version__ = "0.1.0"

# glassbox's own transformers model types (a per-layer-expert MoE) load through AutoModel once glassbox is imported.
from glassbox.models import hf_registry as _hf_registry  # noqa: E402

_hf_registry.install()

from glassbox import hf_models as _hf_models  # noqa: E402

_hf_models.install()     # SwiftKV's model type in transformers' Auto classes, once transformers is imported
