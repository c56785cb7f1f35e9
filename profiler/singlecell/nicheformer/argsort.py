"""The order of numba's ``np.argsort`` (its quicksort), which Nicheformer's tokenizer uses.

Nicheformer ranks a cell's genes with ``np.argsort(-values)`` inside a
``numba.jit`` function, so the order of *tied* values is that of numba's
quicksort (numba/misc/quicksort.py with ``lt_floats``), not index order:
once a cell has 16 or more ranked genes, partitioning swaps tied entries.
This module re-implements that algorithm step for step (median-of-three
pivot, Hoare-style partition that stops on equal keys, an explicit stack
that pushes the larger side, insertion sort below 16 entries, NaN sorted
last) so tokens equal upstream's without numba. When numba is installed
the same Python function is compiled with it, only for speed; the tests
compare both against numba's own ``np.argsort``.

Cells whose keys are all distinct, or that have fewer than 16 keys (where
numba runs only its stable insertion sort), have one possible order; the
caller sorts those vectorized and sends only the rest here.
"""

from __future__ import annotations

import math

import numpy as np

#: numba's SMALL_QUICKSORT: ranges of at most this many + 1 entries are insertion-sorted.
SMALL_QUICKSORT = 15
#: numba's MAX_STACK.
MAX_STACK = 100


def _make(wrap):
    """The sort built with ``wrap`` applied to each function (identity, or numba's ``njit``)."""

    @wrap
    def lt(a, b):
        # numba's lt_floats: NaN compares greater than every number (sorted last)
        return a < b or (math.isnan(b) and not math.isnan(a))

    @wrap
    def insertion_sort(A, R, low, high):
        for i in range(low + 1, high + 1):
            k = R[i]
            v = A[k]
            j = i
            while j > low and lt(v, A[R[j - 1]]):
                R[j] = R[j - 1]
                j -= 1
            R[j] = k

    @wrap
    def partition(A, R, low, high):
        mid = (low + high) >> 1
        # median of three {low, mid, high}, with numba's exact swap pattern
        if lt(A[R[mid]], A[R[low]]):
            R[low], R[mid] = R[mid], R[low]
        if lt(A[R[high]], A[R[mid]]):
            R[high], R[mid] = R[mid], R[high]
        if lt(A[R[mid]], A[R[low]]):
            R[low], R[mid] = R[mid], R[low]
        pivot = A[R[mid]]
        R[high], R[mid] = R[mid], R[high]  # stash the pivot at the end
        i = low
        j = high - 1
        while True:
            while i < high and lt(A[R[i]], pivot):
                i += 1
            while j >= low and lt(pivot, A[R[j]]):
                j -= 1
            if i >= j:
                break
            R[i], R[j] = R[j], R[i]  # entries equal to the pivot are swapped too: this reorders ties
            i += 1
            j -= 1
        R[i], R[high] = R[high], R[i]
        return i

    @wrap
    def argsort_into(A, R):
        # R[:] = numba's np.argsort(A) for the float64 array A
        n = A.shape[0]
        for i in range(n):
            R[i] = i
        if n < 2:
            return
        stack_low = np.zeros(MAX_STACK, dtype=np.int64)
        stack_high = np.zeros(MAX_STACK, dtype=np.int64)
        stack_high[0] = n - 1
        top = 1
        while top > 0:
            top -= 1
            low = stack_low[top]
            high = stack_high[top]
            while high - low >= SMALL_QUICKSORT:
                i = partition(A, R, low, high)
                if high - i > i - low:  # push the larger side, go on with the smaller
                    if high > i:
                        stack_low[top] = i + 1
                        stack_high[top] = high
                        top += 1
                    high = i - 1
                else:
                    if i > low:
                        stack_low[top] = low
                        stack_high[top] = i - 1
                        top += 1
                    low = i + 1
            insertion_sort(A, R, low, high)

    @wrap
    def argsort_segments(keys, starts, stops, out):
        # out[s:e] = s + argsort(keys[s:e]) for each segment [starts[k], stops[k])
        for k in range(starts.shape[0]):
            s = starts[k]
            e = stops[k]
            argsort_into(keys[s:e], out[s:e])
            for t in range(s, e):
                out[t] += s

    return argsort_segments


_SORTS: dict[bool, object] = {}


def compiled_available() -> bool:
    """Whether numba is installed to compile the sort."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def _sort(compiled: bool):
    """The Python sort, or the same functions compiled by numba when numba is installed."""
    if compiled not in _SORTS:
        try:
            import numba
        except ImportError:
            compiled = False
        _SORTS[compiled] = _make(numba.njit(nogil=True) if compiled else (lambda f: f))
    return _SORTS[compiled]


def argsort_segments(keys: np.ndarray, starts, stops, *, compiled: bool = True) -> np.ndarray:
    """Positions ``0..len(keys)``, each segment ``[starts[k], stops[k])`` put in numba's argsort order.

    ``compiled=False`` runs the plain Python functions even when numba is installed.
    """
    keys = np.ascontiguousarray(keys, dtype=np.float64)
    out = np.arange(keys.shape[0], dtype=np.int64)
    _sort(compiled)(keys, np.asarray(starts, dtype=np.int64), np.asarray(stops, dtype=np.int64), out)
    return out


def numba_argsort(keys: np.ndarray, *, compiled: bool = True) -> np.ndarray:
    """numba's ``np.argsort(keys)`` (quicksort) of a 1-d float array, reproduced without needing numba."""
    keys = np.asarray(keys, dtype=np.float64).ravel()
    return argsort_segments(keys, [0], [keys.size], compiled=compiled)
