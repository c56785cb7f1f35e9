"""Permutation p-values and the Westfall–Young family-wise adjustment, from one table of statistics.

Both take ``stat`` shaped [1 + N, K]: row 0 the observed statistic of K hypotheses (e.g. every layer x head
of a family), rows 1..N the same statistics under N relabelings; larger is more extreme. NaN (a head
without elements under a labeling) never counts as extreme.

Ties: the observed labeling and its mirror image (a and b swapped) give the same |D| up to rounding, so a
statistic within a relative ``RTOL`` of another counts as equal.
"""

from __future__ import annotations

import numpy as np

#: Relative tolerance for ties between statistics computed from different labelings (float32 arithmetic).
RTOL = 1e-6


def _at_least(null: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """null >= observed, up to RTOL; NaN is never at least anything."""
    with np.errstate(invalid="ignore"):
        return null >= observed - RTOL * np.abs(observed)


def permutation_p(stat: np.ndarray) -> np.ndarray:
    """p = (1 + #{k >= 1: T_k >= T_0}) / (1 + N) per column; NaN where the observed statistic is NaN.

    With every distinct relabeling enumerated this is the exact p (the observed labeling counted once)."""
    stat = np.asarray(stat, dtype=float)
    n = stat.shape[0] - 1
    p = (1 + _at_least(stat[1:], stat[0]).sum(0)) / (1 + n)
    return np.where(np.isnan(stat[0]), np.nan, p)


def westfall_young(stat: np.ndarray) -> np.ndarray:
    """Single-step min-P adjusted p-values (Westfall & Young 1993), family-wise over the K columns.

    Each labeling's statistics become p-values within their own column's permutation distribution
    (every labeling, the observed one included); the adjusted p of a hypothesis is the share of labelings
    whose smallest p across all K is at most that hypothesis's observed p. It controls the family-wise
    error rate under any dependence between the hypotheses (heads of one layer are far from independent).
    """
    stat = np.asarray(stat, dtype=float)
    total = stat.shape[0]
    filled = np.where(np.isnan(stat), -np.inf, stat)
    # p of every labeling within its column: the share of labelings at least as large (ties: RTOL)
    ranked = np.sort(filled, axis=0)
    below = np.empty_like(filled, dtype=np.int64)
    for k in range(filled.shape[1]):
        col = filled[:, k]
        below[:, k] = np.searchsorted(ranked[:, k], col - RTOL * np.abs(np.where(np.isfinite(col), col, 0)), "left")
    p_all = (total - below) / total
    p_all[np.isinf(filled)] = 1.0  # NaN statistics are never extreme
    min_p = p_all.min(1)  # [1 + N]
    observed = p_all[0]
    adjusted = (min_p[None, :] <= observed[:, None] * (1 + 1e-12)).sum(1) / total
    return np.where(np.isnan(stat[0]), np.nan, adjusted)
