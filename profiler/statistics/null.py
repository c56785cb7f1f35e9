"""Each head's mean |D| and max |D| under many labelings, from per-unit sums: the permutation null.

A unit is a block of the profile: a replicate (replicate level) or a pseudo-replicate of cells (cell
level). For one element, group a's mean under a labeling is ``sum_u w_u X_u / sum_u w_u V_u`` over its
units: at the replicate level ``X`` is each replicate's mean (0 where it is left out) and ``V`` its
validity (0/1), so the group mean is the mean of its replicates' means; at the cell level ``X`` is the
block's sum and ``V`` its cell count, so it is the mean over cells. An element counts under a labeling
where both groups reach ``threshold`` in ``sum V`` (replicates, or cells). A labeling's statistics are
matrix products of its 0/1 weights with the units' values, done for many labelings at once in chunks
that stay in cache; memory is independent of the number of labelings.

At the replicate level (0/1 weights) elements held by the same set of replicates share each labeling's
counts, so their difference is one product with contrast weights ``1/n_a`` and ``-1/n_b`` over the holding
replicates (a linear path, 3-5x faster than the general one); the cell level (counts) and rare holding
patterns take the general path.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import threadpool_limits

#: Labelings and elements per chunk. The products are laid out [heads x elements, labelings] so that the
#: reductions over elements add whole contiguous rows (vectorized): measured fastest on this project's CPUs
#: (0.8 ns per element and labeling, against 1.4-4 ns for the [labelings, elements] layout).
LABEL_CHUNK, ELEMENT_CHUNK = 512, 256
#: Elements held by one set of units take the linear path when at least this many share it (fewer: general).
MIN_PATTERN = 16


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

    A labeling and its mirror image (the groups swapped) have equal statistics in exact arithmetic (|D| is the
    same), so each pair is computed once: in float32 their sums would round apart, and the observed labeling's
    tie with its mirror image, which the smallest p relies on, could break.
    """
    in_a = np.asarray(in_a, dtype=bool)
    first, of_row = _mirror_pairs(in_a)
    if len(first) < len(in_a):
        mean_abs, max_abs = head_null(X, V, in_a[first], threshold, keep, threads)
        return mean_abs[of_row], max_abs[of_row]
    U, H, E = X.shape
    threshold = max(threshold, 1)  # a group holding none of an element has no mean
    keep = np.ones(E, dtype=bool) if keep is None else np.asarray(keep, dtype=bool)
    wa = np.asarray(in_a, dtype=bool).T.astype(np.float32)  # [units, labelings]
    N = wa.shape[1]
    held = keep & (V.sum(0) >= 2 * threshold)  # both groups need `threshold`: other elements never count
    jobs, general = [], held
    if np.isin(V, (0, 1)).all() and U < 63:  # replicate level: group elements by which units hold them (bits)
        pattern = (V.astype(np.int64) << np.arange(U)[:, None]).sum(0)
        kinds, inverse, sizes = np.unique(np.where(held, pattern, -1), return_inverse=True, return_counts=True)
        for code, (kind, size) in enumerate(zip(kinds, sizes)):
            if kind < 0 or size < MIN_PATTERN:
                continue
            idx = np.flatnonzero(inverse == code)
            general = general & (inverse != code)
            v = V[:, idx[0]].astype(np.float32)
            jobs += [(_linear, (wa, v, threshold, _rows(X, chunk))) for chunk in _chunks(idx)]
    jobs += [(_general, (wa, _rows(X, chunk), np.ascontiguousarray(V[:, chunk].T, dtype=np.float32), threshold))
             for chunk in _chunks(np.flatnonzero(general))]  # fmt: skip

    sums, counts, maxes = np.zeros((H, N)), np.zeros((H, N)), np.full((H, N), -np.inf)
    lock = threading.Lock()

    def run(job):  # each chunk of labelings added into the totals as it is done: memory stays per worker
        fn, data = job
        for k in range(0, N, LABEL_CHUNK):
            cols = slice(k, k + LABEL_CHUNK)
            s, c, m = fn(cols, H, *data)
            with lock:
                sums[:, cols] += s
                counts[:, cols] += c
                np.maximum(maxes[:, cols], m, out=maxes[:, cols])

    workers = max(1, min(len(jobs), threads or os.cpu_count() or 1))
    # one BLAS thread per worker: the products are small, and BLAS threads on top of ours oversubscribe
    # the cores (2 workers with 1 BLAS thread each took half the time of 1 worker with 2 here)
    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(run, jobs))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_abs = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    max_abs = np.where(counts > 0, maxes, np.nan)
    return mean_abs.T, max_abs.T


def _mirror_pairs(in_a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(first, of_row)``: the labelings to compute (the first of each mirror pair, and every unpaired one, in
    order) and, for every labeling, its row among them."""
    rows = {row.tobytes(): i for i, row in enumerate(in_a)}
    first, of_row = [], np.empty(len(in_a), dtype=np.int64)
    for i, row in enumerate(in_a):
        j = rows.get((~row).tobytes())
        if j is not None and j < i:  # the mirror image came first: share its row
            of_row[i] = of_row[j]
        else:
            of_row[i] = len(first)
            first.append(i)
    return np.asarray(first, dtype=np.int64), of_row


def _chunks(idx: np.ndarray):
    return [idx[i : i + ELEMENT_CHUNK] for i in range(0, len(idx), ELEMENT_CHUNK)]


def _rows(X: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The units' values of some elements as contiguous float32 rows [heads * elements, units]."""
    U, H, _ = X.shape
    return np.ascontiguousarray(X[:, :, idx].transpose(1, 2, 0).reshape(H * len(idx), U), dtype=np.float32)


def _pattern_contrast(wa: np.ndarray, v: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """For elements held by the units ``v`` (0/1 [units]): D = values @ contrast, the mean of a's holding units
    minus b's, under every labeling; 0 (and not valid) where a group holds fewer than ``threshold`` units."""
    held = wa * v[:, None]
    ca, cb = held.sum(0), (v[:, None] - held).sum(0)
    valid = (ca >= threshold) & (cb >= threshold)
    with np.errstate(divide="ignore", invalid="ignore"):
        contrast = held / ca - (v[:, None] - held) / cb
    return np.where(valid, contrast, 0).astype(np.float32), valid


def _linear(cols: slice, H: int, wa: np.ndarray, v: np.ndarray, threshold: float, M: np.ndarray):
    """Sum, count and max of |D| per head over elements held by the units ``v``: D = M @ contrast."""
    contrast, valid = _pattern_contrast(wa[:, cols], v, threshold)
    D = np.abs(M @ contrast).reshape(H, -1, contrast.shape[1])  # [heads, elements, labelings]; 0 if not valid
    return D.sum(1), np.broadcast_to(valid * float(D.shape[1]), (H, contrast.shape[1])), D.max(1)


def _general(cols: slice, H: int, wa_all: np.ndarray, M: np.ndarray, Vt: np.ndarray, threshold: float):
    """Sum, count and max of |D| per head: each group's mean as a weighted sum of its units' values."""
    wa = wa_all[:, cols]
    ca = Vt @ wa  # [elements, labelings]
    cb = Vt.sum(1, keepdims=True) - ca
    valid = (ca >= threshold) & (cb >= threshold)
    sa = (M @ wa).reshape(H, -1, wa.shape[1])  # [heads, elements, labelings]
    sb = M.sum(1).reshape(H, -1, 1) - sa
    with np.errstate(invalid="ignore", divide="ignore"):
        D = np.abs(sa / np.where(valid, ca, 1) - sb / np.where(valid, cb, 1))
    count = np.broadcast_to(valid.sum(0, dtype=np.float64), (H, wa.shape[1]))
    return np.where(valid, D, 0).sum(1), count, np.where(valid, D, -np.inf).max(1)
