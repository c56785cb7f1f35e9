"""Deprecated: now :mod:`attnprof.singlecell.nicheformer.technologies`; names kept here."""

from ._moved import warn_moved
from .nicheformer.technologies import (
    DEFAULT,
    DISSOCIATED,
    KINDS,
    PUBLISHED_MEANS,
    UNPAIRED_MEANS,
    TechnologyMeans,
    column_ids,
    means_entries,
    obs_context,
    published_folder,
    technology_key,
)

__all__ = ["DEFAULT", "DISSOCIATED", "KINDS", "PUBLISHED_MEANS", "UNPAIRED_MEANS", "TechnologyMeans", "column_ids",
           "means_entries", "obs_context", "published_folder", "technology_key"]  # fmt: skip
warn_moved("attnprof.singlecell.technologies", "attnprof.singlecell.nicheformer.technologies")
