"""The deprecation warning of the old module paths kept as shims (tokenize, technologies, argsort, counts,
nicheformer_front): their code lives in the family sub-packages now."""

from __future__ import annotations

import warnings


def warn_moved(old: str, new: str) -> None:
    """Warn, at the import that names ``old``, that the module is now ``new``."""
    warnings.warn(f"{old} moved to {new}; import from {new} (the old path will be removed)", DeprecationWarning,
                  stacklevel=3)  # fmt: skip
