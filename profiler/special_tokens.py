"""Which token ids are special (context, padding, <cls>, ...) rather than genes: known by id, not by name.

A run's front end records the ids in ``profile.meta["special_tokens"]``; the tables keep those tokens apart
from the genes (a gene whose name happens to look like ``<...>`` stays a gene). Profiles without the
record (older files, the Python API without a front end) fall back to the shape of the name.
"""

from __future__ import annotations

import numpy as np

#: The profile meta key of the special token ids.
META_KEY = "special_tokens"


def looks_special(name) -> bool:
    """The name-shape fallback: ``<species:mouse>``, ``<pad>``, ``[CLS]``."""
    name = str(name)
    return len(name) > 1 and ((name[0], name[-1]) in {("<", ">"), ("[", "]")})


def special_token_mask(profile) -> np.ndarray:
    """Bool per gene id of ``profile.genes``: True for special tokens (by the recorded ids when present)."""
    ids = (profile.meta or {}).get(META_KEY)
    if ids is None:
        return np.array([looks_special(g) for g in profile.genes], dtype=bool)
    mask = np.zeros(len(profile.genes), dtype=bool)
    mask[np.asarray(ids, dtype=np.int64)] = True
    return mask
