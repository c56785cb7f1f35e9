"""Merging profiles: what two profiles must share to be summed, the sum itself (blocks united), the identities
of the cells a merge must not count twice, and the merged metadata."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .profile import Profile


def check_compatible(a: Profile, b: Profile) -> None:
    """Raise ``ValueError`` naming what differs when ``b`` cannot be summed with ``a``.

    Compared: the layout, and the ``model`` and ``options`` metadata (what must agree between
    shards of one run); the ``data`` metadata (source, subset, cells) is per shard and may differ.
    """
    mine, theirs = a.layout(), b.layout()
    diff = [k for k in mine if mine[k] != theirs[k]]
    if diff:
        details = "; ".join(f"{k}: {_short(mine[k])} vs {_short(theirs[k])}" for k in diff)
        hint = " (a vocabulary mismatch: profile with the model's own gene list)" if "genes" in diff else ""
        raise ValueError(
            f"cannot merge profiles of different layout ({details}){hint}; "
            f"profile every shard with the same model, groups, window, vocabulary and panel"
        )
    for key in ("model", "options"):
        if key in a.meta and key in b.meta and a.meta[key] != b.meta[key]:
            where = ", ".join(_differing_keys(a.meta[key], b.meta[key], key))
            raise ValueError(
                f"cannot merge profiles made with a different {key} ({where}): "
                f"{_short(a.meta[key])} vs {_short(b.meta[key])}; profile every shard the same way"
            )


def summed(a: Profile, b: Profile, meta: dict) -> Profile:
    """The sums of two profiles of one layout, their blocks united (parts holding other replicates)."""
    blocks, mine, theirs = a.blocks.union(b.blocks)
    if mine is None:
        sums = {k: a.sums[k] + b.sums[k] for k in a.sums}
    else:  # parts holding other replicates: each part's blocks go to their place in the union
        sums = {}
        for k, x in a.sums.items():
            total = np.zeros((x.shape[0], len(blocks), *x.shape[2:]))
            total[:, mine] += x
            total[:, theirs] += b.sums[k]
            sums[k] = total
    ids = None
    if a.cell_ids is not None and b.cell_ids is not None:
        ids = np.sort(np.concatenate([a.cell_ids, b.cell_ids]))
    return type(a)(sums, **{**a._fields(), "meta": dict(meta), "blocks": blocks}, cell_ids=ids)


def cell_ids(source: str, obs_names) -> np.ndarray:
    """Sorted 64-bit identities of cells: a hash of the data file's name and each cell's obs name.

    The file's name, not its folder: shards read on different machines see one file at different paths.
    pandas' hash_array (SipHash with a fixed key) is stable across runs and machines. 8 bytes per cell:
    8 MB per million cells in the profile, hashed in well under a second. Two different cells collide
    with probability about n**2 / 2**65 (3e-6 for 10 million cells), which would only refuse a merge.
    """
    import pandas as pd

    names = pd.Index(obs_names).astype(str)
    keys = (Path(str(source)).name + "\x00" + names).to_numpy(dtype=object)
    return np.sort(pd.util.hash_array(keys, categorize=False))


def shared_cells(a: Profile, b: Profile) -> int:
    """How many cells two profiles both count (0 when either lacks cell identities)."""
    if a.cell_ids is None or b.cell_ids is None or not len(a.cell_ids) or not len(b.cell_ids):
        return 0
    at = np.minimum(np.searchsorted(b.cell_ids, a.cell_ids), len(b.cell_ids) - 1)  # both sorted
    return int(np.count_nonzero(b.cell_ids[at] == a.cell_ids))


def check_disjoint(profiles, names) -> None:
    """Refuse profiles that share cells, naming the first two that do and how many cells they share."""
    profiles, names = list(profiles), [str(n) for n in names]
    for i in range(len(profiles)):
        for j in range(i + 1, len(profiles)):
            shared = shared_cells(profiles[i], profiles[j])
            if shared:
                raise ValueError(
                    f"{names[i]} and {names[j]} share {shared} cells (by data file name and obs name): merging "
                    f"would count them twice; merge profiles of disjoint cells, e.g. the shards of one run "
                    f"(not a run with one of its shards, nor overlapping subsets)"
                )


def merged_meta(a: dict, b: dict) -> dict:
    """Meta of a merge: ``a``'s, with the shards' ``data`` listed and compute time summed."""
    meta = dict(a)
    meta["merged"] = int(a.get("merged", 1)) + int(b.get("merged", 1))
    if "elapsed_s" in a or "elapsed_s" in b:
        meta["elapsed_s"] = round(float(a.get("elapsed_s") or 0) + float(b.get("elapsed_s") or 0), 3)
    if "data" in a or "data" in b:
        shards = _shards(a) + _shards(b)
        digests = [s["cells_digest"] for s in shards if s.get("cells_digest")]
        twice = sorted({d for d in digests if digests.count(d) > 1})
        if twice:
            raise ValueError(
                f"two of the profiles cover the same cells (cells digest {twice[0]}): merging would count "
                f"them twice; merge each shard once"
            )
        meta["data"] = {"shards": shards}
    return meta


def _shards(meta: dict) -> list[dict]:
    data = meta.get("data") or {}
    return list(data["shards"]) if "shards" in data else [dict(data)]


def _differing_keys(a, b, prefix: str) -> list[str]:
    """Dotted names of the entries that differ between two nested dicts."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [prefix]
    out = []
    for k in sorted(set(a) | set(b), key=str):
        if a.get(k) != b.get(k):
            out += _differing_keys(a.get(k), b.get(k), f"{prefix}.{k}")
    return out


def _short(x, n: int = 80) -> str:
    s = repr(x)
    return s if len(s) <= n else s[: n - 3] + "..."
