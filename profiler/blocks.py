"""Blocks: the units a profile keeps its sums apart for, so that a test can relabel whole replicates.

A block is one replicate (animal, donor, sample, section) of one group; with strata, each replicate also
names the stratum (batch, section) within which group labels may be exchanged. With subset keys (cell type,
tissue: ``--subset-by``) a block is one replicate of one group within one combination of the keys' values,
so one profile holds every cell type's sums, and :meth:`attnprof.Profile.view` adds blocks up into any key's
groups, within any subset. Without a replicate key the
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
    pseudo: the blocks are pseudo-replicates (random sets of one group's cells), not real replicates;
    subset_keys: the obs columns the blocks are also kept apart by (``--subset-by``), and subsets: every
    block's values of them (None without subset keys)."""

    group: tuple[int, ...]
    names: tuple[str, ...]
    strata: tuple[str, ...] | None = None
    pseudo: bool = True
    subset_keys: tuple[str, ...] = ()
    subsets: tuple[tuple[str, ...], ...] | None = None

    def __post_init__(self):
        if bool(self.subset_keys) != (self.subsets is not None):
            raise ValueError("subset_keys and subsets go together: both or neither")
        if self.subsets is not None and any(len(s) != len(self.subset_keys) for s in self.subsets):
            raise ValueError(f"every block needs one value per subset key {list(self.subset_keys)}")

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
        """Pseudo-replicate blocks per group (per group and subset with subset keys; pseudo blocks only)."""
        return len({n for g, n in zip(self.group, self.names) if g == 0}) if self.pseudo else 0

    def subset_values(self, key: str) -> np.ndarray:
        """str [blocks]: every block's value of one subset key."""
        if key not in self.subset_keys:
            raise ValueError(f"{key!r} is not a subset key of this profile (subset keys: {list(self.subset_keys)}; "
                             f"profile with --subset-by {key} to keep its values apart)")  # fmt: skip
        i = self.subset_keys.index(key)
        return np.array([s[i] for s in self.subsets], dtype=object)

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
        return {"pseudo": self.pseudo, "per_group": self.per_group, "strata": self.strata is not None,
                "subset_keys": list(self.subset_keys)}

    def union(self, other: Blocks) -> tuple[Blocks, np.ndarray | None, np.ndarray | None]:
        """The blocks of two profiles united by (group, name), and where each one's blocks go in the union
        (None, None when they are the same): shards or files holding other animals merge into one profile."""
        if other == self:
            return self, None, None
        if other.kind() != self.kind():
            raise ValueError(f"cannot merge profiles with other blocks ({_kind(self)} vs {_kind(other)}): profile "
                             f"every part with the same --replicate/--strata (or --pseudo-replicates)")  # fmt: skip
        keys, owner = {}, {}
        for blocks in (self, other):
            for key, s in zip(blocks._keys(), blocks.strata or [None] * len(blocks)):
                g, _, n = key
                if not blocks.pseudo and owner.setdefault(n, (g, s)) != (g, s):
                    seen = owner[n]
                    raise ValueError(f"replicate {n!r} is in group code {seen[0]} (stratum {seen[1]}) in one profile "
                                     f"and {g} (stratum {s}) in the other: a replicate lies in one group and stratum")  # fmt: skip
                keys[key] = s
        order = sorted(keys)
        union = Blocks(tuple(g for g, _, _ in order), tuple(n for _, _, n in order),
                       None if self.strata is None else tuple(keys[k] for k in order), self.pseudo,
                       self.subset_keys, None if self.subsets is None else tuple(s for _, s, _ in order))  # fmt: skip
        index = {k: i for i, k in enumerate(order)}

        def where(b: Blocks) -> np.ndarray:
            return np.array([index[k] for k in b._keys()], dtype=np.int64)

        return union, where(self), where(other)

    def _keys(self) -> list[tuple]:
        """What names a block across profiles: (group code, subset values, replicate name)."""
        subsets = self.subsets or [()] * len(self)
        return list(zip(self.group, subsets, self.names))

    def to_json(self) -> dict:
        return {"group": list(self.group), "names": list(self.names),
                "strata": None if self.strata is None else list(self.strata), "pseudo": self.pseudo,
                "subset_keys": list(self.subset_keys),
                "subsets": None if self.subsets is None else [list(s) for s in self.subsets]}  # fmt: skip

    @classmethod
    def from_json(cls, d: dict) -> Blocks:
        strata, subsets = d.get("strata"), d.get("subsets")
        return cls(tuple(int(g) for g in d["group"]), tuple(str(n) for n in d["names"]),
                   None if strata is None else tuple(str(s) for s in strata), bool(d["pseudo"]),
                   tuple(str(k) for k in d.get("subset_keys", ())),
                   None if subsets is None else tuple(tuple(str(v) for v in s) for s in subsets))  # fmt: skip


def _kind(blocks: Blocks) -> str:
    if blocks.pseudo:
        return f"{blocks.per_group} pseudo-replicates per group"
    return "replicates" + (" within strata" if blocks.strata is not None else "")


def design_blocks(codes, groups: Sequence[str], replicates=None, strata=None, *, replicate_key: str = "replicate",
                  strata_key: str = "strata", per_group: int = PSEUDO_REPLICATES, seed: int = 0,
                  subsets: Mapping[str, Sequence] | None = None):  # fmt: skip
    """The blocks of a selection of cells and each cell's block code.

    codes:      group code of every selected cell (all >= 0).
    replicates: each cell's replicate label (e.g. the obs column ``animal``), or None: the cells of each
                group are then dealt at random (``seed``) into ``per_group`` pseudo-replicate blocks, over the
                whole selection, so that shards of one run add up to it.
    strata:     each cell's stratum label, or None. Every replicate must lie in one group and one stratum.
    subsets:    subset key -> each cell's value (``--subset-by``), or None: every block is split by the
                combination of the keys' values its cells hold (pseudo-replicates are then dealt within each
                group and combination, ``per_group`` blocks each, so every subset has its own).
    """
    codes = np.asarray(codes, dtype=np.int64)
    combos, combo_codes = _combinations(subsets, len(codes))
    if replicates is None:
        if strata is not None:
            raise ValueError(f"--strata names strata of replicates: give --replicate too ({strata_key!r} alone "
                             f"cannot be honoured with pseudo-replicates)")  # fmt: skip
        blocks = Blocks.pseudo_replicates(len(groups), per_group)
        rng = np.random.default_rng(seed)
        index = np.zeros(len(codes), dtype=np.int64)
        dealt = codes * len(combos) + combo_codes  # without subsets: the group codes
        for g in range(len(groups) * len(combos)):
            cells = np.flatnonzero(dealt == g)
            index[cells] = rng.permutation(np.arange(len(cells)) % per_group)
        base = codes * per_group + index
        if subsets is None:
            return blocks, base
        present = np.unique(dealt)  # every present (group, combination) gets all its pseudo-replicates
        pairs = [(g * per_group + k, c) for g, c in zip(*np.divmod(present, len(combos))) for k in range(per_group)]
        return _split(blocks, base, combo_codes, combos, tuple(subsets), pairs)
    replicates = _labels(replicates, replicate_key)
    owner = _one_each(replicates, np.asarray(groups, dtype=object)[codes].astype(str), replicate_key, "group",
                      "a replicate (animal, donor, sample) must lie in one group: check the replicate key")  # fmt: skip
    order = {g: i for i, g in enumerate(groups)}
    owner = dict(sorted(owner.items(), key=lambda kv: (order[kv[1]], kv[0])))
    stratum = None
    if strata is not None:
        stratum = _one_each(replicates, _labels(strata, strata_key), replicate_key, strata_key,
                            "labels are exchanged between whole replicates within a stratum, so strata must be coarser "
                            "than replicates (batch, section); compare within a cell type with --subset-by instead")  # fmt: skip
    blocks = Blocks.of_replicates(groups, owner, stratum)
    base = blocks.codes(codes, replicates)
    if subsets is None:
        return blocks, base
    pairs = sorted(set(zip(base.tolist(), combo_codes.tolist())))
    return _split(blocks, base, combo_codes, combos, tuple(subsets), pairs)


def _combinations(subsets: Mapping[str, Sequence] | None, n: int) -> tuple[list[tuple[str, ...]], np.ndarray]:
    """The sorted combinations of the subset keys' values and each cell's index among them (one empty
    combination without subsets)."""
    if subsets is None:
        return [()], np.zeros(n, dtype=np.int64)
    if not subsets:
        raise ValueError("subsets= needs at least one key (or None)")
    columns = [_labels(values, key).tolist() for key, values in subsets.items()]
    if any(len(c) != n for c in columns):
        raise ValueError(f"every subset key needs one value per selected cell ({n})")
    cells = list(zip(*columns))
    combos = sorted(set(cells))
    index = {c: i for i, c in enumerate(combos)}
    return combos, np.fromiter((index[c] for c in cells), dtype=np.int64, count=n)


def _split(blocks: Blocks, base: np.ndarray, combo_codes: np.ndarray, combos, keys: tuple[str, ...], pairs):
    """``blocks`` split by subset: one block per (block, combination) pair in ``pairs`` (sorted), and each
    cell's code among them."""
    pairs = sorted(pairs)
    index = {pair: i for i, pair in enumerate(pairs)}
    split = Blocks(
        tuple(blocks.group[b] for b, _ in pairs), tuple(blocks.names[b] for b, _ in pairs),
        None if blocks.strata is None else tuple(blocks.strata[b] for b, _ in pairs), blocks.pseudo,
        keys, tuple(combos[c] for _, c in pairs),
    )  # fmt: skip
    codes = np.fromiter((index[p] for p in zip(base.tolist(), combo_codes.tolist())), dtype=np.int64, count=len(base))
    return split, codes


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
