"""attnprof: exact group-wise attention statistics for transformer models.

Swap fused kernels into a model's attention layers (:class:`Profiler`), run
batches as usual, and get a :class:`Profile` of sums per layer, head and block
(replicate of a group); ``profile.compare(a, b)`` turns it into difference tables.
"""

from attnprof.kernels import BACKENDS, SUMMARIES, StatsSpec, attention_stats

from .adapters import ADAPTERS, UnsupportedAttention
from .profile import Profile, merge
from .session import Profiler
from .tables import Comparison, compare
from .validate import validate

#: The single-cell front end's names, imported on first use: ``import attnprof`` loads the core only.
_SINGLECELL = ("Nicheformer", "load_nicheformer", "profile_anndata", "tokenize_anndata")


def __getattr__(name: str):
    if name in _SINGLECELL:
        from . import singlecell

        return getattr(singlecell, name)
    raise AttributeError(f"module 'attnprof' has no attribute {name!r}")

__version__ = "0.1.0"

__all__ = [
    "ADAPTERS",
    "BACKENDS",
    "SUMMARIES",
    "Comparison",
    "Profile",
    "Profiler",
    "StatsSpec",
    "UnsupportedAttention",
    "attention_stats",
    "compare",
    "Nicheformer",
    "load_nicheformer",
    "merge",
    "profile_anndata",
    "tokenize_anndata",
    "validate",
]
