"""Deprecated: now :mod:`attnprof.singlecell.nicheformer.front` (``TokenModel``: :mod:`attnprof.singlecell.family`);
names kept here."""

from ._moved import warn_moved
from .family import TokenModel
from .nicheformer.front import NicheformerFront, model_shape, nicheformer_front

__all__ = ["NicheformerFront", "TokenModel", "model_shape", "nicheformer_front"]
warn_moved("attnprof.singlecell.nicheformer_front", "attnprof.singlecell.nicheformer.front")
