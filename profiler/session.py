"""The public profiling context: swap the profiled attention in, run batches, get a Profile."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack

import torch

from .adapters import ADAPTERS, pick_adapter
from .blocks import PSEUDO_REPLICATES, Blocks
from .profile import Profile
from .recorder import Recorder


class Profiler:
    """Profile a model's attention per group while it runs as usual.

    >>> with Profiler(model, groups=["female", "male"], genes=vocab, window=64,
    ...               replicates={"m1": "male", "m2": "male", "f1": "female", "f2": "female"}) as prof:
    ...     for x, mask, tokens, labels, animals in batches:
    ...         prof.set_batch(groups=labels, tokens=tokens, replicates=animals)
    ...         model(x, src_key_padding_mask=mask)
    >>> profile = prof.profile

    groups:    the group names; ``set_batch`` takes names or codes (-1 = not counted).
    replicates: replicate name -> group name (animals, donors, samples: the unit a claim about groups
               rests on); the sums are kept per replicate and ``set_batch`` takes each cell's replicate.
               Without it the cells of each group are dealt at random into ``pseudo_replicates`` blocks,
               and the comparison treats cells as independent replicates (and says so).
    strata:    replicate name -> stratum (batch, section): group labels are exchanged only within one.
    blocks:    the :class:`~attnprof.blocks.Blocks` themselves (instead of ``replicates``/``strata``).
    seed:      seed of the pseudo-replicate dealing.
    window:    position window W of the per-head maps.
    genes:     vocabulary (token id -> name) or its size; turns on gene statistics.
    panel:     genes (names or token ids) whose pairwise attention is summed.
    n_context: leading context tokens C for the ``context_mass`` summary.
    map_bins:  bins per axis of the whole-context maps (0 = none): each head's attention over the whole
               context, binned (``profile.binned_map(group, layer, head)``); needs ``map_length``.
    map_length: the positions those bins cover: the model's context length (the same for every batch,
               whatever its padded length; a real token beyond it is refused).
    backend:   ``auto`` (triton on CUDA, torch on CPU), ``torch``, ``triton`` or ``reference``.
    adapter:   ``auto`` or an adapter name from ``attnprof.adapters.ADAPTERS``.
    meta:      extra facts to keep in ``profile.meta`` (with the backend, adapter and model class).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        groups: Sequence[str],
        *,
        window: int = 64,
        genes: Sequence[str] | int | None = None,
        panel: Sequence | None = None,
        n_context: int = 0,
        backend: str = "auto",
        adapter: str = "auto",
        meta: dict | None = None,
        replicates: dict | None = None,
        strata: dict | None = None,
        blocks: Blocks | None = None,
        pseudo_replicates: int = PSEUDO_REPLICATES,
        seed: int = 0,
        map_bins: int = 0,
        map_length: int = 0,
    ):
        self.model = model
        groups = [str(g) for g in groups]
        if blocks is not None:
            if replicates is not None or strata is not None:
                raise ValueError("give either blocks= or replicates= (and strata=), not both")
        elif replicates is not None:
            blocks = Blocks.of_replicates(groups, replicates, strata)
        elif strata is not None:
            raise ValueError("strata= names the stratum of each replicate: pass replicates= too")
        else:
            blocks = Blocks.pseudo_replicates(len(groups), pseudo_replicates)
        self.recorder = Recorder(groups, window=window, genes=genes, panel=panel, n_context=n_context,
                                 backend=backend, blocks=blocks, seed=seed, map_bins=map_bins,
                                 map_length=map_length)  # fmt: skip
        self._swap = pick_adapter(model, adapter)
        adapter = next(name for name, swap in ADAPTERS.items() if swap is self._swap)
        self.meta = {"backend": backend, "adapter": adapter, "model_class": type(model).__name__, **(meta or {})}
        self._stack: ExitStack | None = None

    def __enter__(self) -> Profiler:
        if self.recorder._handed is not None:
            raise RuntimeError("this Profiler's sums were handed over to its profile after its last session: make "
                               "a new Profiler to profile more cells (and merge the profiles)")  # fmt: skip
        self.recorder.closed = False
        self._stack = ExitStack()
        self.layers = self._stack.enter_context(self._swap(self.model, self.recorder))
        self.recorder.capacity = len(self.layers) if isinstance(self.layers, (list, tuple)) else 0
        return self

    def __exit__(self, *exc):
        stack, self._stack = self._stack, None
        self.recorder.closed = True  # nothing records any more: profile() may hand the sums over
        suppress = stack.__exit__(*exc)  # adapters see the exception in flight, if any
        if exc[0] is None:
            self.recorder.check_finite()  # the last forward's NaN/Inf verdict (the triton backend defers it)
        return suppress

    def set_batch(self, groups, tokens=None, replicates=None, null_groups=None) -> None:
        """Before each forward: the group of every cell (names or codes), the token ids [B, L] and, when the
        profiler was given ``replicates=``, every cell's replicate name.

        Permutations are drawn at compare time: ``profile.compare(a, b, permutations=N)`` relabels whole
        replicates from the kept block sums (``null_groups`` raises a TypeError saying so).
        """
        self.recorder.set_batch(groups, tokens, replicates, null_groups)

    @property
    def profile(self) -> Profile:
        return self.recorder.profile(self.meta)
