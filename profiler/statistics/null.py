"""Each head's mean |D| and max |D| under many labelings, from per-unit sums: the permutation null.

A unit is a block of the profile: a replicate (replicate level) or a pseudo-replicate of cells (cell
level). For one element, group a's mean under a labeling is ``sum_u w_u X_u / sum_u w_u V_u`` over its
units: at the replicate level ``X`` is each replicate's mean (0 where it is left out) and ``V`` its
validity (0/1), so the group mean is the mean of its replicates' means; at the cell level ``X`` is the
block's sum and ``V`` its cell count, so it is the mean over cells. An element counts under a labeling
where both groups reach ``threshold`` in ``sum V`` (replicates, or cells). A labeling's statistics are
matrix products of its 0/1 weights with the units' values, done for many labelings at once in chunks
that stay in cache; memory is independent of the number of labelings.

Elements that every unit holds with weight 1 (the usual case at the replicate level) take a faster
path: their difference is one product with the contrast weights ``1/n_a`` and ``-1/n_b``.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

#: Labelings and elements per chunk. The products are laid out [heads x elements, labelings] so that the
#: reductions over elements add whole contiguous rows (vectorized); [256 x 16 heads x 256] float32 blocks
#: (4 MB) measured fastest on this project's CPUs (0.8 ns per element and labeling, against 1.4-4 ns for
#: the [labelings, elements] layout).
LABEL_CHUNK, ELEMENT_CHUNK = 512, 256


def head_null(X: np.ndarray, V: np.ndarray, in_a: np.ndarray, threshold: float, keep: np.ndarray | None = None,
              threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Mean |D| and max |D| per head under every labeling.

    X:         [units, heads, elements] unit values (see the module doc).
    V:         [units, elements] unit weights.
    in_a:      bool [labelings, units]: True where the unit is in group a, else in group b.
    threshold: the ``sum V`` each group needs for an element to count (min replicates, or min cells).
    keep:      bool [elements], elements that may count at all (e.g. genes but not context tokens).
    threads:   worker threads (default: the CPUs); numpy releases the GIL in its loops.
    Returns ``mean_abs`` and ``max_abs``, float64 [labelings, heads], NaN where a head has no element.
    """
    U, H, E = X.shape
    keep = np.ones(E, dtype=bool) if keep is None else np.asarray(keep, dtype=bool)
    wa = np.asarray(in_a, dtype=bool).T.astype(np.float32)  # [units, labelings]
    N = wa.shape[1]
    n_a = wa.sum(0)
    n_b = U - n_a
    complete = keep & np.all(V == 1, axis=0)
    if not complete.any() or min(n_a.min(), n_b.min()) < threshold:
        complete[:] = False
    general = keep & ~complete & (V.sum(0) > 0)
    contrast = wa / n_a - (1 - wa) / n_b  # D = values @ contrast: the mean of a's units minus b's
    jobs = [(_complete, (_rows(X, idx), H), contrast) for idx in _chunks(complete)]
    jobs += [(_general, (_rows(X, idx), np.ascontiguousarray(V[:, idx].T, dtype=np.float32), threshold, H), wa)
             for idx in _chunks(general)]  # fmt: skip

    def run(job):
        fn, data, weights = job
        s, c, m = np.zeros((H, N)), np.zeros((H, N)), np.full((H, N), -np.inf)
        for k in range(0, N, LABEL_CHUNK):
            cols = slice(k, k + LABEL_CHUNK)
            s[:, cols], c[:, cols], m[:, cols] = fn(weights[:, cols], *data)
        return s, c, m

    sums, counts, maxes = np.zeros((H, N)), np.zeros((H, N)), np.full((H, N), -np.inf)
    workers = max(1, min(len(jobs), threads or os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for s, c, m in pool.map(run, jobs):
            sums += s
            counts += c
            np.maximum(maxes, m, out=maxes)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_abs = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    max_abs = np.where(counts > 0, maxes, np.nan)
    return mean_abs.T, max_abs.T


def _chunks(mask: np.ndarray):
    idx = np.flatnonzero(mask)
    return [idx[i : i + ELEMENT_CHUNK] for i in range(0, len(idx), ELEMENT_CHUNK)]


def _rows(X: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The units' values of some elements as contiguous float32 rows [heads * elements, units]."""
    U, H, _ = X.shape
    return np.ascontiguousarray(X[:, :, idx].transpose(1, 2, 0).reshape(H * len(idx), U), dtype=np.float32)


def _complete(contrast: np.ndarray, M: np.ndarray, H: int):
    """Sum, count and max of |D| per head over elements every unit holds: D = M @ contrast."""
    D = np.abs(M @ contrast).reshape(H, -1, contrast.shape[1])  # [heads, elements, labelings]
    return D.sum(1), np.full((H, D.shape[2]), D.shape[1], dtype=np.float64), D.max(1)


def _general(wa: np.ndarray, M: np.ndarray, Vt: np.ndarray, threshold: float, H: int):
    """Sum, count and max of |D| per head: each group's mean as a weighted sum of its units' values."""
    ca = Vt @ wa  # [elements, labelings]
    cb = Vt.sum(1, keepdims=True) - ca
    valid = (ca >= threshold) & (cb >= threshold)
    sa = (M @ wa).reshape(H, -1, wa.shape[1])  # [heads, elements, labelings]
    sb = M.sum(1).reshape(H, -1, 1) - sa
    with np.errstate(invalid="ignore", divide="ignore"):
        D = np.abs(sa / np.where(valid, ca, 1) - sb / np.where(valid, cb, 1))
    count = np.broadcast_to(valid.sum(0, dtype=np.float64), (H, wa.shape[1]))
    return np.where(valid, D, 0).sum(1), count, np.where(valid, D, -np.inf).max(1)
