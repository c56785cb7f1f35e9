"""Blocks: the units a profile keeps its sums apart for, so that a test can relabel whole replicates.

A block is one replicate (animal, donor, sample, section) of one group; with strata, each replicate also
names the stratum (batch, section) within which group labels may be exchanged. Without a replicate key the
cells of each group are dealt at random into ``PSEUDO_REPLICATES`` pseudo-replicate blocks, so the same
machinery gives a cell-level permutation null: the blocks are random sets of cells, and relabeling them
approximates shuffling cell labels (8 blocks per group allow C(16, 8) = 12,870 relabelings of a two-group
comparison; the approximation costs a little power against shuffling single cells). Blocks are sums like
every other statistic: shards, merge, resume and all-reduce stay exact.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

#: Pseudo-replicate blocks per group without a replicate key: C(16, 8) = 12,870 relabelings of two groups,
#: enough for permutation p down to 0.001 (7 would give 3,432; 5 only 252).
PSEUDO_REPLICATES = 8


@dataclass(frozen=True)
class Blocks:
    """group: the group code of every block; names: its replicate's name; strata: its stratum (or None);
    pseudo: the blocks are pseudo-replicates (random sets of one group's cells), not real replicates."""

    group: tuple[int, ...]
    names: tuple[str, ...]
    strata: tuple[str, ...] | None = None
    pseudo: bool = True

    @classmethod
    def pseudo_replicates(cls, n_groups: int, per_group: int = PSEUDO_REPLICATES) -> Blocks:
        if per_group < 1:
            raise ValueError(f"pseudo_replicates must be at least 1 per group, got {per_group}")
        group = tuple(g for g in range(n_groups) for _ in range(per_group))
        return cls(group, tuple(f"pseudo{k}" for _ in range(n_groups) for k in range(per_group)), None, True)

    @classmethod
    def of_replicates(cls, groups: Sequence[str], replicates: Mapping, strata: Mapping | None = None) -> Blocks:
        """One block per replicate: ``replicates`` maps each replicate name to its group's name,
        ``strata`` (optional) each replicate to its stratum."""
        index = {g: i for i, g in enumerate(groups)}
        unknown = sorted({str(g) for g in replicates.values() if str(g) not in index})
        if unknown:
            raise ValueError(f"replicates are assigned to groups {unknown[:5]} that are not among {list(groups)}")
        names = tuple(str(r) for r in replicates)
        if len(set(names)) != len(names):
            raise ValueError("replicate names must be unique (as strings)")
        if strata is not None:
            missing = [r for r in replicates if r not in strata]
            if missing:
                raise ValueError(f"replicates {missing[:5]} have no stratum: strata= must name one for each")
            strata = tuple(str(strata[r]) for r in replicates)
        return cls(tuple(index[str(g)] for g in replicates.values()), names, strata, False)

    def __len__(self) -> int:
        return len(self.group)

    @property
    def per_group(self) -> int:
        """Pseudo-replicate blocks per group (pseudo blocks only)."""
        return self.group.count(0) if self.pseudo else 0

    @cached_property
    def _group(self) -> np.ndarray:
        return np.asarray(self.group, dtype=np.int64)

    def of_group(self, g: int) -> np.ndarray:
        """bool [blocks]: the blocks of group code ``g``."""
        return self._group == g

    def codes(self, group_codes: np.ndarray, replicates) -> np.ndarray:
        """Block codes of cells (-1 where the group code is -1) from their replicate names; a replicate whose
        cells carry another group than its own is refused, naming it (a replicate lies in one group)."""
        group_codes = np.asarray(group_codes)
        index = {n: i for i, n in enumerate(self.names)}
        labels = np.asarray(replicates).astype(str).ravel()
        if len(labels) != len(group_codes):
            raise ValueError(f"replicates= has {len(labels)} labels for {len(group_codes)} cells")
        counted = group_codes >= 0
        unknown = sorted({x for x in labels[counted] if x not in index})
        if unknown:
            raise ValueError(f"replicates {unknown[:10]} are not among the profile's replicates "
                             f"({len(self.names)} declared): declare every replicate when the profiler starts")  # fmt: skip
        codes = np.full(len(labels), -1, dtype=np.int64)
        codes[counted] = [index[x] for x in labels[counted]]
        wrong = counted & (self._group[np.maximum(codes, 0)] != group_codes)
        if wrong.any():
            i = int(np.flatnonzero(wrong)[0])
            raise ValueError(
                f"replicate {labels[i]!r} holds cells of group code {int(group_codes[i])} but belongs to group code "
                f"{self.group[codes[i]]}: a replicate (animal, donor) must lie in one group; check the replicate key"
            )
        return codes

    def kind(self) -> dict:
        """What two profiles' blocks must share to merge (names may differ: merging unites them)."""
        return {"pseudo": self.pseudo, "per_group": self.per_group, "strata": self.strata is not None}

    def union(self, other: Blocks) -> tuple[Blocks, np.ndarray | None, np.ndarray | None]:
        """The blocks of two profiles united by (group, name), and where each one's blocks go in the union
        (None, None when they are the same): shards or files holding other animals merge into one profile."""
        if other == self:
            return self, None, None
        if other.kind() != self.kind():
            raise ValueError(f"cannot merge profiles with other blocks ({_kind(self)} vs {_kind(other)}): profile "
                             f"every part with the same --replicate/--strata (or --pseudo-replicates)")  # fmt: skip
        keys = {}
        for blocks in (self, other):
            for g, n, s in zip(blocks.group, blocks.names, blocks.strata or [None] * len(blocks)):
                if blocks.pseudo:
                    keys[(g, n)] = s
                    continue
                seen = next(((g2, s2) for (g2, n2), s2 in keys.items() if n2 == n), None)
                if seen is not None and seen != (g, s):
                    raise ValueError(f"replicate {n!r} is in group code {seen[0]} (stratum {seen[1]}) in one profile "
                                     f"and {g} (stratum {s}) in the other: a replicate lies in one group and stratum")  # fmt: skip
                keys[(g, n)] = s
        order = sorted(keys)
        union = Blocks(tuple(g for g, _ in order), tuple(n for _, n in order),
                       None if self.strata is None else tuple(keys[k] for k in order), self.pseudo)  # fmt: skip
        index = {k: i for i, k in enumerate(order)}

        def where(b: Blocks) -> np.ndarray:
            return np.array([index[(g, n)] for g, n in zip(b.group, b.names)], dtype=np.int64)

        return union, where(self), where(other)

    def to_json(self) -> dict:
        return {"group": list(self.group), "names": list(self.names),
                "strata": None if self.strata is None else list(self.strata), "pseudo": self.pseudo}  # fmt: skip

    @classmethod
    def from_json(cls, d: dict) -> Blocks:
        strata = d.get("strata")
        return cls(tuple(int(g) for g in d["group"]), tuple(str(n) for n in d["names"]),
                   None if strata is None else tuple(str(s) for s in strata), bool(d["pseudo"]))  # fmt: skip


def _kind(blocks: Blocks) -> str:
    if blocks.pseudo:
        return f"{blocks.per_group} pseudo-replicates per group"
    return "replicates" + (" within strata" if blocks.strata is not None else "")


def design_blocks(codes, groups: Sequence[str], replicates=None, strata=None, *, replicate_key: str = "replicate",
                  strata_key: str = "strata", per_group: int = PSEUDO_REPLICATES, seed: int = 0):  # fmt: skip
    """The blocks of a selection of cells and each cell's block code.

    codes:      group code of every selected cell (all >= 0).
    replicates: each cell's replicate label (e.g. the obs column ``animal``), or None: the cells of each
                group are then dealt at random (``seed``) into ``per_group`` pseudo-replicate blocks, over the
                whole selection, so that shards of one run add up to it.
    strata:     each cell's stratum label, or None. Every replicate must lie in one group and one stratum.
    """
    codes = np.asarray(codes, dtype=np.int64)
    if replicates is None:
        if strata is not None:
            raise ValueError(f"--strata names strata of replicates: give --replicate too ({strata_key!r} alone "
                             f"cannot be honoured with pseudo-replicates)")  # fmt: skip
        blocks = Blocks.pseudo_replicates(len(groups), per_group)
        rng = np.random.default_rng(seed)
        index = np.zeros(len(codes), dtype=np.int64)
        for g in range(len(groups)):
            cells = np.flatnonzero(codes == g)
            index[cells] = rng.permutation(np.arange(len(cells)) % per_group)
        return blocks, codes * per_group + index
    replicates = _labels(replicates, replicate_key)
    owner = _one_each(replicates, np.asarray(groups, dtype=object)[codes].astype(str), replicate_key, "group",
                      "a replicate (animal, donor, sample) must lie in one group: check the replicate key")  # fmt: skip
    order = {g: i for i, g in enumerate(groups)}
    owner = dict(sorted(owner.items(), key=lambda kv: (order[kv[1]], kv[0])))
    stratum = None
    if strata is not None:
        stratum = _one_each(replicates, _labels(strata, strata_key), replicate_key, strata_key,
                            "labels are exchanged between whole replicates within a stratum, so strata must be coarser "
                            "than replicates (batch, section); compare within a cell type with --subset instead")  # fmt: skip
    blocks = Blocks.of_replicates(groups, owner, stratum)
    return blocks, blocks.codes(codes, replicates)


def _labels(values, key: str) -> np.ndarray:
    values = np.asarray(values, dtype=object)
    missing = np.array([v is None or (isinstance(v, float) and np.isnan(v)) for v in values], dtype=bool)
    if missing.any():
        raise ValueError(f"{int(missing.sum())} selected cells have no {key!r} value (NaN): give every cell one, "
                         f"or leave them out with --subset")  # fmt: skip
    return values.astype(str)


def _one_each(keys: np.ndarray, values: np.ndarray, key: str, what: str, why: str) -> dict[str, str]:
    """key -> its one value; a key found with two values is refused, naming it."""
    out: dict[str, str] = {}
    for k, v in zip(*np.unique(np.stack([keys, values]), axis=1).tolist()):
        if k in out:
            raise ValueError(f"{key} {k!r} has cells in {what} {out[k]!r} and {v!r}: {why}")
        out[k] = v
    return out
