"""A profile seen through another key or within a subset: its blocks added up into other groups.

A profile made with ``--subset-by`` keeps one block per replicate, group and combination of the subset keys'
values (e.g. animal x sex x cell type). :func:`view` adds those blocks up into the blocks a profile grouped by
any kept key would hold, over only the cells of a subset: ``view(p, within={"cell_type": "HY GABA"})`` is the
sex contrast within one cell type, ``view(p, "tissue")`` the same cells grouped by tissue. Sums add, so a view
equals a run made that way (same cells, same replicates), and everything that reads a Profile reads a view.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from .blocks import Blocks

if TYPE_CHECKING:
    from .profile import Profile


def keys(profile: Profile) -> dict[str, list[str]]:
    """Every kept key (the groups' key first, then each subset key) -> its values, in the profile's order."""
    out = {group_key(profile): list(profile.groups)}
    blocks, order = profile.blocks, (profile.meta.get("data") or {}).get("subset_values", {})
    for key in blocks.subset_keys:
        present = set(blocks.subset_values(key).tolist())
        known = [v for v in order.get(key, []) if v in present]  # the obs column's order where recorded
        out[key] = known + sorted(present - set(known))
    return out


def group_key(profile: Profile) -> str:
    """The obs column of the profile's groups (``--groupby``), or ``"group"`` when not recorded."""
    return str(profile.meta.get("options", {}).get("groupby") or "group")


def view(profile: Profile, key: str | None = None, within: Mapping[str, str] | None = None) -> Profile:
    """The profile grouped by ``key`` (default: its groups' key) over the cells whose values match ``within``
    (a subset key, or the groups' key, -> one value). Blocks of one replicate (or pseudo-replicate) that the
    view no longer tells apart are added up; the result has no subset keys."""
    within = dict(within or {})
    blocks, gkey = profile.blocks, group_key(profile)
    key = gkey if key is None else str(key)
    if key == gkey and not within and not blocks.subset_keys:
        return profile
    known = keys(profile)
    for k, v in [(key, None), *within.items()]:
        if k not in known:
            raise ValueError(f"{k!r} is not a key of this profile: it keeps {list(known)} (profile with "
                             f"--subset-by {k} to keep its values apart)")  # fmt: skip
        if v is not None and str(v) not in known[k]:
            raise ValueError(f"{k} has no value {v!r} in this profile; its values: {known[k]}")
    selected = np.ones(len(blocks), dtype=bool)
    for k, v in within.items():
        selected &= _values(profile, k) == str(v)
    values = _values(profile, key)
    groups = [g for g in known[key] if np.any(selected & (values == g))]
    if not groups:
        raise ValueError(f"no cells of this profile match {within}")
    new, members = _collapsed(blocks, values, groups, selected)
    sums = {name: np.stack([arr[:, m].sum(1) for m in members], axis=1) for name, arr in profile.sums.items()}
    meta = {**profile.meta, "options": {**profile.meta.get("options", {}), "groupby": key},
            "view": {"key": key, "within": {k: str(v) for k, v in within.items()}}}  # fmt: skip
    meta.pop("contrast", None)  # the saved contrast names the profile's own groups
    fields = {**profile._fields(), "groups": groups, "meta": meta, "blocks": new}
    return type(profile)(sums, **fields, cell_ids=None)  # a view cannot be merged with its profile's cells


def _values(profile: Profile, key: str) -> np.ndarray:
    if key == group_key(profile):
        return np.asarray(profile.groups, dtype=object)[np.asarray(profile.blocks.group)]
    return profile.blocks.subset_values(key)


def _collapsed(blocks: Blocks, values: np.ndarray, groups: list[str], selected: np.ndarray):
    """The view's blocks, one per (group, replicate) among the selected blocks, and the old blocks each adds
    up. A replicate may hold cells of several of the key's groups (an animal's tissues): its blocks then stay
    apart, and a comparison of two of those groups is refused (:func:`check_crossed`)."""
    order = {}
    strata = blocks.strata or [None] * len(blocks)
    for i in np.flatnonzero(selected):
        order.setdefault((groups.index(values[i]), blocks.names[i]), []).append(i)
    ids = sorted(order)
    new = Blocks(tuple(g for g, _ in ids), tuple(n for _, n in ids),
                 None if blocks.strata is None else tuple(strata[order[k][0]] for k in ids), blocks.pseudo)  # fmt: skip
    return new, [np.asarray(order[k]) for k in ids]


def check_crossed(profile: Profile, a: int, b: int) -> None:
    """Refuse a comparison of groups ``a`` and ``b`` that share a replicate: its cells would be on both sides,
    and whole replicates could not be relabeled."""
    blocks = profile.blocks
    if blocks.pseudo:
        return
    names = [{n for g, n in zip(blocks.group, blocks.names) if g == code} for code in (a, b)]
    shared = sorted(names[0] & names[1])
    if shared:
        key = group_key(profile)
        raise ValueError(
            f"replicates {shared[:5]} have cells in both {key} {profile.groups[a]!r} and {profile.groups[b]!r}: a "
            f"replicate-level test needs each replicate on one side; compare within one {key} (--within), or "
            f"compare at the cell level (Python: compare(a, b, unit='cell'))"
        )
