"""Deprecated: now :mod:`attnprof.singlecell.nicheformer.counts`; names kept here."""

from ._moved import warn_moved
from .nicheformer.counts import expm1, inspect_counts, log1p_tolerance, read_rows

__all__ = ["expm1", "inspect_counts", "log1p_tolerance", "read_rows"]
warn_moved("attnprof.singlecell.counts", "attnprof.singlecell.nicheformer.counts")
