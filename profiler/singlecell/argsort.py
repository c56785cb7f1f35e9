"""Deprecated: now :mod:`attnprof.singlecell.nicheformer.argsort`; names kept here."""

from ._moved import warn_moved
from .nicheformer.argsort import MAX_STACK, SMALL_QUICKSORT, argsort_segments, compiled_available, numba_argsort

__all__ = ["MAX_STACK", "SMALL_QUICKSORT", "argsort_segments", "compiled_available", "numba_argsort"]
warn_moved("attnprof.singlecell.argsort", "attnprof.singlecell.nicheformer.argsort")
