"""The public profiling context: swap the profiled attention in, run batches, get a Profile."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack

import torch

from .adapters import ADAPTERS, pick_adapter
from .profile import Profile
from .recorder import Recorder


class Profiler:
    """Profile a model's attention per group while it runs as usual.

    >>> with Profiler(model, groups=["female", "male"], genes=vocab, window=64) as prof:
    ...     for x, mask, tokens, labels in batches:
    ...         prof.set_batch(groups=labels, tokens=tokens)
    ...         model(x, src_key_padding_mask=mask)
    >>> profile = prof.profile

    groups:    the group names; ``set_batch`` takes names or codes (-1 = not counted).
    window:    position window W of the per-head maps.
    genes:     vocabulary (token id -> name) or its size; turns on gene statistics.
    panel:     genes (names or token ids) whose pairwise attention is summed.
    n_context: leading context tokens C for the ``context_mass`` summary.
    backend:   ``auto`` (triton on CUDA, torch on CPU), ``torch``, ``triton`` or ``reference``.
    adapter:   ``auto`` or an adapter name from ``attnprof.adapters.ADAPTERS``.
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
    ):
        self.model = model
        self.recorder = Recorder(groups, window=window, genes=genes, panel=panel, n_context=n_context, backend=backend)
        self._swap = pick_adapter(model, adapter)
        adapter = next(name for name, swap in ADAPTERS.items() if swap is self._swap)
        self.meta = {"backend": backend, "adapter": adapter, "model_class": type(model).__name__, **(meta or {})}
        self._stack: ExitStack | None = None

    def __enter__(self) -> Profiler:
        self.recorder.closed = False
        self._stack = ExitStack()
        self.layers = self._stack.enter_context(self._swap(self.model, self.recorder))
        return self

    def __exit__(self, *exc):
        stack, self._stack = self._stack, None
        self.recorder.closed = True  # nothing records any more
        suppress = stack.__exit__(*exc)  # adapters see the exception in flight, if any
        if exc[0] is None:
            self.recorder.check_finite()  # the last forward's NaN/Inf verdict (the triton backend defers it)
        return suppress

    def set_batch(self, groups, tokens=None, null_groups=None) -> None:
        """Before each forward: the group of every cell (names or codes) and the token ids [B, L].

        ``null_groups``: N permuted labelings of the batch's cells for permutation p-values
        (``profile.compare(a, b, permutations=N)``); each costs one more attention pass per layer.
        """
        self.recorder.set_batch(groups, tokens, null_groups)

    @property
    def profile(self) -> Profile:
        return self.recorder.profile(self.meta)
