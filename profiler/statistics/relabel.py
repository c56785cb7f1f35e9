"""Relabelings of whole replicates within strata: the permutation null of a replicate-level design.

Under the null hypothesis the group labels of replicates (animals, donors) are exchangeable within a
stratum (batch, section), so a test relabels whole replicates, never single cells. When the distinct
relabelings are fewer than the permutations asked for, all of them are enumerated (an exact test: with
3 vs 3 animals there are 20, and the observed labeling's mirror image ties it, so no p of |D| below
2/20 = 0.1); otherwise they are drawn at random (Monte Carlo).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np


@dataclass
class Relabelings:
    """Labelings of the units of a two-group comparison.

    in_a:     bool [1 + N, units]: row 0 the observed labeling, then N relabelings (True: group a).
    exact:    the N rows are every distinct relabeling but the observed one (an exact test); else
              N random draws (Monte Carlo).
    distinct: how many distinct labelings the design allows (the observed one included).
    """

    in_a: np.ndarray
    exact: bool
    distinct: int

    @property
    def n(self) -> int:
        return len(self.in_a) - 1

    @property
    def mirrored(self) -> bool:
        """Every distinct relabeling is enumerated and the observed labeling's mirror image (the groups
        swapped) is among them: a statistic of |D| ties it, so no p falls below 2 / (1 + N)."""
        return self.exact and bool(np.any(np.all(self.in_a[1:] == ~self.in_a[0], axis=1)))

    @property
    def min_p(self) -> float:
        """The smallest p of a statistic of |D| with these relabelings: 1 / (1 + N), or 2 / (1 + N) when the
        mirror image of the observed labeling is enumerated too (equal group sizes in every stratum)."""
        return (2.0 if self.mirrored else 1.0) / (1 + self.n)


def count_relabelings(in_a: np.ndarray, strata: np.ndarray) -> int:
    """Distinct labelings with the same number of a-units in every stratum: the product of binomials."""
    total = 1
    for s in np.unique(strata):
        members = in_a[strata == s]
        total *= math.comb(len(members), int(members.sum()))
    return total


def relabelings(in_a, strata=None, n: int = 999, seed: int = 0) -> Relabelings:
    """The observed labeling and ``n`` relabelings of the units (exact enumeration when there are no more
    than ``n`` others). ``in_a``: bool [units], ``strata``: [units] labels within which units exchange."""
    in_a = np.asarray(in_a, dtype=bool)
    strata = np.zeros(len(in_a), dtype=np.int64) if strata is None else np.unique(np.asarray(strata), return_inverse=True)[1]
    if n < 0:
        raise ValueError(f"permutations must be >= 0, got {n}")
    distinct = count_relabelings(in_a, strata)
    if distinct - 1 <= n:
        others = [row for row in _enumerate(in_a, strata) if not np.array_equal(row, in_a)]
        rows = np.array([in_a, *others], dtype=bool).reshape(len(others) + 1, len(in_a))
        return Relabelings(rows, True, distinct)
    rng = np.random.default_rng(seed)
    rows = np.empty((n + 1, len(in_a)), dtype=bool)
    rows[0] = in_a
    for s in np.unique(strata):
        idx = np.flatnonzero(strata == s)
        order = np.argsort(rng.random((n, len(idx))), axis=1)  # n independent shuffles of the stratum
        rows[1:, idx] = in_a[idx][order]
    return Relabelings(rows, False, distinct)


def _enumerate(in_a: np.ndarray, strata: np.ndarray):
    """Every labeling with the observed number of a-units in each stratum."""
    per_stratum = []
    for s in np.unique(strata):
        idx = np.flatnonzero(strata == s)
        per_stratum.append([(idx, chosen) for chosen in itertools.combinations(idx, int(in_a[idx].sum()))])
    for combo in itertools.product(*per_stratum):
        row = np.zeros(len(in_a), dtype=bool)
        for _, chosen in combo:
            row[list(chosen)] = True
        yield row
