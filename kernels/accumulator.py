"""The owner of a run's sums: their layout, where they live, and the backends' deferred NaN/Inf verdicts.

An :class:`Accumulator` keeps every layer's float64 sums of the first ``labelings`` labelings of the plans
it is given (``sum_shapes`` with a labeling axis: ``[n, G, ...]``). Per layer, the dense sums sit side by
side in one ``[n, G, F]`` buffer and the gene sums in one ``[n, G, 2H + 1, V]`` block
(:func:`~.reduce.tiled_zeros`), so a layer call adds all of them with one matmul, and one matmul and one
scatter per gene chunk, whatever the number of statistics or groups.

On the CPU every layer's buffer of a family is a slot of one zeroed numpy array allocated for the layers the
caller announced (``layers``): its untouched pages cost nothing, and :meth:`to_numpy` hands the sums over
as they are, without a copy. A layer beyond those, or any layer on a GPU, has buffers of its own.

The caller talks to a plan and an accumulator: :meth:`attend` runs the backend on a layer's ``q, k, v``
and adds its result; :meth:`check_finite` takes the verdicts a backend deferred (the triton backend's,
one host sync for all the calls on a plan) and raises naming the layer.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from .backends import add_result, get_backend
from .plan import BatchPlan
from .reduce import Target, tiled_zeros
from .spec import StatsSpec, check_qkv, sum_shapes


class Accumulator:
    """Every layer's sums of one run.

    spec, heads: the statistics and the head count (the sums' shapes, :func:`sum_shapes`).
    labelings: how many labelings of each plan to keep (the first ones; the profiler keeps one).
    genes: ``[V_b]`` slot of each of a plan's genes on the sums' gene axis, or None (slot = token id).
    backend: a backend name (``auto`` resolved per device) or a :class:`~.backends.Backend`.
    layers: the layers the caller will add (the CPU store's slots; more still work, in buffers of their own).
    """

    def __init__(self, spec: StatsSpec, heads: int, labelings: int = 1, genes=None, *, backend="auto", layers: int = 0):
        self.spec, self.heads, self.labelings, self.genes = spec, int(heads), int(labelings), genes
        self.backend = backend
        self.shapes = {name: (self.labelings, *shape) for name, shape in sum_shapes(spec, self.heads).items()}
        self.capacity = max(int(layers), 1)
        self.layers: list[str] = []  # in the order they were first added: the store's slots
        self._targets: dict[str, Target] = {}
        self._buffers: dict[str, dict[str, torch.Tensor]] = {}  # layer -> family ("dense", "genes") -> its buffer
        self._store: dict[str, np.ndarray] = {}  # CPU: family -> [capacity, n, G, ...] zeros, every layer's slot
        self._storage: dict[str, torch.UntypedStorage] = {}  # the same memory, as torch storage
        self._pending: list = []  # (plan, backend, layers called on it) whose deferred verdicts are not taken

    # ------------------------------------------------------------------ adding
    def attend(self, layer: str, q, k, v, plan: BatchPlan, scale: float | None = None) -> torch.Tensor:
        """One layer call: the backend's output, its result added into ``layer``'s sums."""
        scale = check_qkv(q, k, v, scale)
        plan.check_fits(q)
        backend = get_backend(self.backend, q.device)
        with torch.no_grad():
            out, result = backend.cells(q, k, v, plan, scale)
            self.add(layer, plan, result, backend)
        return out

    def add(self, layer: str, plan: BatchPlan, result, backend=None) -> None:
        """Add a backend's result of one layer call on ``plan`` into ``layer``'s sums; ``backend``: the one
        that made it, when it may defer its NaN/Inf verdict (see :meth:`check_finite`)."""
        if layer not in self._targets:
            self._allocate(layer, plan.device)
        add_result(plan, result, self._targets[layer])
        if backend is not None:  # the calls on each plan, in order: a deferred verdict indexes them
            entry = next((e for e in self._pending if e[0] is plan), None)
            if entry is None:
                entry = (plan, backend, [])
                self._pending.append(entry)
            entry[2].append(layer)

    def _allocate(self, layer: str, device: torch.device) -> None:
        slot, buffers = len(self.layers), {}

        def alloc(family: str, shape: tuple) -> torch.Tensor:
            if device.type == "cpu" and slot < self.capacity:
                buffers[family] = self._slot(family, shape, slot)
            else:
                buffers[family] = torch.zeros(shape, dtype=torch.float64, device=device)
            return buffers[family]

        sums = tiled_zeros(self.shapes, alloc=alloc)
        self._targets[layer] = Target(sums, slice(0, self.labelings), self.genes)
        self._buffers[layer] = buffers
        self.layers.append(layer)

    def _slot(self, family: str, shape: tuple, slot: int) -> torch.Tensor:
        """Slot ``slot`` of the family's store as a tensor of its own (not a view of the store: each layer's
        buffers have their own base, as ``torch.compile``'s custom op needs)."""
        if family not in self._store:
            self._store[family] = np.zeros((self.capacity, *shape))
            self._storage[family] = torch.from_numpy(self._store[family]).untyped_storage()  # once: no per-layer op
        return torch.empty(0, dtype=torch.float64).set_(self._storage[family], slot * self._store[family][0].size, shape)

    # ---------------------------------------------------------------- verdicts
    def check_finite(self) -> None:
        """Raise if a layer call whose backend deferred its verdict had NaN or Inf in q, k or v (one host sync
        per plan, for all its calls so far)."""
        pending, self._pending = self._pending, []
        for plan, backend, layers in pending:
            bad = backend.finish(plan)
            if bad is not None:
                layer = layers[min(bad, len(layers) - 1)]
                raise ValueError(
                    f"layer {layer!r}: q, k or v contains NaN or Inf (or the attention scores overflowed): the "
                    f"model's activations are not finite before attention (check the inputs and the dtype; fp16 "
                    f"overflows above 65504). The run's sums now hold NaN: fix the cause and profile again."
                )

    # ------------------------------------------------------------------ reading
    def __contains__(self, layer: str) -> bool:
        return layer in self._targets

    def sums(self, layer: str) -> dict[str, torch.Tensor]:
        """``layer``'s sums, name -> ``[n, G, ...]`` (views of its buffers: they change as calls add)."""
        return self._targets[layer].sums

    def buffers(self, layer: str) -> list[torch.Tensor]:
        """The storage buffers of ``layer``'s sums (one per family), in a fixed order; none before its first
        call."""
        return list(self._buffers.get(layer, {}).values())

    @contextlib.contextmanager
    def rebased(self, layer: str, given: list[torch.Tensor]):
        """For the block's duration, ``layer``'s sums are views of ``given`` (buffers laid out as
        :meth:`buffers` returns them, e.g. a compiled graph's functionalized copies) at their own offsets."""
        own = self.buffers(layer)
        if not given or all(a is b for a, b in zip(own, given)):
            yield
            return
        if len(own) != len(given) or any(a.shape != b.shape or a.stride() != b.stride() for a, b in zip(own, given)):
            raise RuntimeError(f"layer {layer!r}: sum buffers given laid out otherwise than the accumulator's")
        saved = self._targets[layer]
        views = {}
        for name, t in saved.sums.items():
            i = next(i for i, b in enumerate(own) if _within(t, b))
            offset = given[i].storage_offset() + t.storage_offset() - own[i].storage_offset()
            views[name] = given[i].as_strided(t.shape, t.stride(), offset)
        self._targets[layer] = Target(views, saved.labelings, saved.genes)
        try:
            yield
        finally:
            self._targets[layer] = saved

    def to_numpy(self, layers: list[str] | None = None, *, release: bool = False) -> dict[str, np.ndarray]:
        """The sums of ``layers`` (default: all, in the order they were first added), name ->
        ``[len(layers), n, G, ...]`` float64 numpy.

        A copy, unless ``release``: then the accumulator gives its memory away and keeps nothing. Layers in the
        CPU store's slots, in slot order, come as read-only views of the store (no copy); any other layer is
        copied and its buffers freed one by one (the hand-over peaks at the sums plus one layer).
        """
        layers = list(self.layers if layers is None else layers)
        missing = [layer for layer in layers if layer not in self._targets]
        if missing:
            raise KeyError(f"no sums for layers {missing}")
        if release and layers == self.layers[: len(layers)] and all(self._slotted(layer) for layer in layers):
            out = self._store_views(len(layers))
        else:
            out = {name: np.empty((len(layers), *shape)) for name, shape in self.shapes.items()}
            for i, layer in enumerate(layers):
                for name, t in self._targets[layer].sums.items():
                    out[name][i] = t.cpu().numpy()
                if release:  # free this layer's buffers before the next is copied
                    del self._targets[layer], self._buffers[layer]
        if release:
            self._targets.clear()
            self._store.clear()
            self._storage.clear()
            self._buffers.clear()
            self.layers = []
        return out

    def _slotted(self, layer: str) -> bool:
        """Every buffer of ``layer`` is its slot of the CPU store."""
        slot = self.layers.index(layer)
        return slot < self.capacity and all(f in self._store and b.data_ptr() == self._store[f][slot].ctypes.data
                   for f, b in self._buffers[layer].items())  # fmt: skip

    def _store_views(self, n_layers: int) -> dict[str, np.ndarray]:
        """Every sum of the first ``n_layers`` slots as a read-only view of the store: each family's columns
        hold its sums side by side, as :func:`tiled_zeros` laid them out."""
        first = self._targets[self.layers[0]].sums
        out = {}
        for family, store in self._store.items():
            base = self._buffers[self.layers[0]][family]
            flat = store[:n_layers]  # [layers, n, G, F]
            for name, shape in self.shapes.items():
                t = first[name]
                if not _within(t, base):
                    continue  # a sum of the other family
                start = (t.data_ptr() - base.data_ptr()) // 8
                width = int(np.prod(shape[2:], dtype=np.int64))
                view = flat[..., start : start + width].reshape(n_layers, *shape)
                assert np.may_share_memory(view, store)  # a view, never a silent copy (bounds: np.shares_memory takes 0.1 s)
                view.flags.writeable = False
                out[name] = view
        return {name: out[name] for name in self.shapes}


def _within(t: torch.Tensor, buffer: torch.Tensor) -> bool:
    """``t`` lies in ``buffer``'s memory (views made in inference mode have no ``_base`` to ask)."""
    start = buffer.data_ptr()
    return start <= t.data_ptr() < start + buffer.numel() * buffer.element_size()
