"""Accumulates the kernels' per-batch sums per layer during a profiling run.

Adapters call :meth:`Recorder.attend` from inside the model's attention
layers; the caller says before each forward which groups and tokens the batch
has (:meth:`Recorder.set_batch`). No model knowledge and no math lives here.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Sequence

import numpy as np
import torch

from attnprof.kernels import BatchPlan, StatsSpec, Target, build_plan, planned_stats, sum_shapes, tiled_zeros

from .blocks import Blocks
from .profile import Profile


class Recorder:
    def __init__(
        self,
        groups: Sequence[str],
        *,
        window: int = 64,
        genes: Sequence[str] | int | None = None,
        panel: Sequence | None = None,
        n_context: int = 0,
        backend: str = "auto",
        blocks: Blocks | None = None,
        seed: int = 0,
        map_bins: int = 0,
        map_length: int = 0,
    ):
        self.groups = [str(g) for g in groups]
        if len(set(self.groups)) != len(self.groups):
            raise ValueError(f"group names must be unique, got {self.groups}")
        # the sums are kept per block (replicate, or pseudo-replicate of cells): what a test relabels
        self.blocks = Blocks.pseudo_replicates(len(self.groups)) if blocks is None else blocks
        if max(self.blocks.group, default=-1) >= len(self.groups):
            raise ValueError(f"blocks name group codes up to {max(self.blocks.group)}, but there are "
                             f"{len(self.groups)} groups")  # fmt: skip
        self._deal = np.random.default_rng(seed)  # pseudo-replicates dealt here when the caller gives none
        self._dealt = np.zeros(len(self.groups), dtype=np.int64)  # cells dealt so far per group
        if isinstance(genes, int):
            genes = [str(i) for i in range(genes)]
        self.genes = None if genes is None else [str(g) for g in genes]
        self.panel = self._panel_ids(panel or [])
        self.spec = StatsSpec(
            n_groups=len(self.blocks),
            window=window,
            vocab_size=None if self.genes is None else len(self.genes),
            panel=tuple(self.panel),
            n_context=n_context,
            map_bins=map_bins,
            map_length=map_length,
        )
        self.backend = backend
        self.layers: list[str] = []
        self.sums: dict[str, dict[str, torch.Tensor]] = {}
        self._store: dict[str, np.ndarray] = {}  # CPU: family -> [layers, ...] zeros holding every layer's sums
        self._store_storage: dict[str, torch.UntypedStorage] = {}  # the same memory, as torch storage
        self.capacity = 0  # attention modules the adapter swapped: the layers the CPU store has slots for
        self.n_heads: int | None = None
        self._batch = None
        self._calls: dict[str, int] = {}
        self._warned_grad = False
        self._plan = None  # (plan, padding mask it was built from, that mask's version)
        self._plan_layers: list[str] = []  # layers called on the plan, in call order (its NaN/Inf verdicts)
        self._derived: dict = {}  # per_forward's results for this forward
        # layer -> (its sums as the Target was made from them, the Target: views with a labeling axis, made once)
        self.closed = False  # the session ended: profile() hands the sums over, freeing them as it goes
        self._handed: Profile | None = None  # the profile handed over after the session
        self._views: dict = {}

    def _panel_ids(self, panel) -> list[int]:
        if not panel:
            return []
        if self.genes is None:
            raise ValueError("a gene-pair panel needs a vocabulary: pass genes= (names or the vocabulary size)")
        index = {g: i for i, g in enumerate(self.genes)}
        ids, unknown = [], []
        for p in panel:
            if isinstance(p, (int, np.integer)):
                ids.append(int(p))
            elif str(p) in index:
                ids.append(index[str(p)])
            else:
                unknown.append(p)
        if unknown:
            raise ValueError(f"panel genes {unknown[:10]} are not in the vocabulary ({len(self.genes)} names)")
        return ids

    # -------------------------------------------------------------- the batch
    def group_codes(self, groups) -> torch.Tensor:
        """Group codes from int codes (-1 = not counted) or from group names."""
        arr = np.asarray(groups)
        if arr.dtype.kind in "iu":
            return torch.as_tensor(arr, dtype=torch.long)
        index = {g: i for i, g in enumerate(self.groups)}
        unknown = sorted({str(x) for x in arr.ravel() if str(x) not in index})
        if unknown:
            raise ValueError(f"group labels {unknown[:10]} are not among the profiled groups {self.groups}")
        return torch.as_tensor([index[str(x)] for x in arr.ravel()], dtype=torch.long)

    def set_batch(self, groups, tokens=None, replicates=None, null_groups=None) -> None:
        """Say which group each cell of the next forward belongs to, and its token ids [B, L].

        replicates: each cell's replicate name, when the blocks are replicates (required then). With
        pseudo-replicate blocks: optionally each cell's pseudo-replicate index in ``[0, per group)``
        (a run that shards deals them over all its cells); by default the cells are dealt here at random.
        """
        if null_groups is not None:
            raise TypeError(
                "set_batch(null_groups=...) is gone: permutations no longer run in the forward pass. The profile "
                "keeps sums per replicate (or pseudo-replicate) block and compare(a, b, permutations=N) relabels "
                "whole blocks; give the Profiler replicates={name: group} and set_batch each cell's replicates="
            )
        self.set_block_batch(self.block_codes(self.group_codes(groups).numpy(), replicates), tokens)

    def set_block_batch(self, codes, tokens=None) -> None:
        """:meth:`set_batch` with every cell's block code given (-1: not counted), e.g. by a run that deals
        its pseudo-replicates over all its cells."""
        codes = np.asarray(codes, dtype=np.int64)
        if np.any((codes < -1) | (codes >= len(self.blocks))):
            raise ValueError(f"block codes must lie in [-1, {len(self.blocks)})")
        if self.genes is not None and tokens is None:
            raise ValueError("gene statistics are on (genes= was given): pass tokens= with the batch's token ids")
        self.check_finite()  # the previous forward's verdict, before its plan goes
        self._batch = (torch.as_tensor(codes)[None], None if tokens is None else torch.as_tensor(tokens))
        self._plan = None  # built at the forward's first layer call, where padding and device are known
        self._calls = {}
        self._derived = {}

    def block_codes(self, codes: np.ndarray, replicates=None) -> np.ndarray:
        """The block of every cell (-1: not counted) from its group code and replicate."""
        if np.any((codes < -1) | (codes >= len(self.groups))):
            raise ValueError(f"group codes must lie in [-1, {len(self.groups)}) (-1: not counted), got "
                             f"{sorted(set(codes[(codes < -1) | (codes >= len(self.groups))].tolist()))[:5]}")  # fmt: skip
        blocks = self.blocks
        if not blocks.pseudo:
            if replicates is None:
                raise ValueError("this profile keeps sums per replicate: pass replicates= (each cell's replicate) "
                                 "to set_batch")  # fmt: skip
            return blocks.codes(codes, replicates)
        k = blocks.per_group
        if replicates is None:  # deal each group's cells round-robin from where it stopped, in random order
            index = np.zeros(len(codes), dtype=np.int64)
            for g in np.unique(codes[codes >= 0]):
                cells = np.flatnonzero(codes == g)
                index[cells] = self._deal.permutation((self._dealt[g] + np.arange(len(cells))) % k)
                self._dealt[g] += len(cells)
        else:
            index = np.asarray(replicates, dtype=np.int64).ravel()
            if index.shape != codes.shape or np.any((codes >= 0) & ((index < 0) | (index >= k))):
                raise ValueError(f"pseudo-replicate indices must be one per cell, in [0, {k})")
        return np.where(codes >= 0, codes * k + index, -1)

    def per_forward(self, derive: Callable, mask, *args):
        """``derive(mask, *args)``, computed once per forward for a given mask tensor: later layers of
        the forward that pass the same (unmodified) tensor get the same result object back, with no op
        and no host sync. Adapters convert and check a model's attention mask with it; ``derive`` may
        raise (nothing is kept then)."""
        if not isinstance(mask, torch.Tensor):
            return derive(mask, *args)
        key = (id(mask), _version(mask), derive, *args)
        hit = self._derived.get(key)
        if hit is not None and hit[0]() is mask:  # the weak reference rules out a reused id
            return hit[1]
        value = derive(mask, *args)
        self._derived[key] = (weakref.ref(mask), value)
        return value

    def check_finite(self) -> None:
        """Raise if a layer call since the last check had NaN or Inf in q, k or v. The triton backend
        defers this verdict (it would wait for the device in every layer): one host sync, taken once
        per forward (at the next set_batch, when the plan changes, and when the profile is read)."""
        if self._plan is None or not self._plan_layers:
            return
        layers, self._plan_layers = self._plan_layers, []
        plan = self._plan[0]
        if "triton" not in plan.cache:  # only the triton backend defers the verdict
            return
        from attnprof.kernels.triton_stats import first_non_finite

        bad = first_non_finite(plan)
        if bad is not None:
            layer = layers[min(bad, len(layers) - 1)]
            raise ValueError(
                f"layer {layer!r}: q, k or v contains NaN or Inf (or the attention scores overflowed): the model's "
                f"activations are not finite before attention (check the inputs and the dtype; fp16 overflows above "
                f"65504). The run's sums now hold NaN: fix the cause and profile again."
            )

    # ----------------------------------------------------- called by adapters
    def register(self, layer: str) -> None:
        if layer not in self.layers:
            self.layers.append(layer)

    def attend(self, layer: str, q, k, v, key_padding_mask=None, scale=None) -> torch.Tensor:
        """Profiled attention for one layer: returns the output, accumulates the sums."""
        if torch.compiler.is_compiling():  # one opaque custom op for torch.compile (attnprof.compiled)
            from .compiled import compiled_attend

            return compiled_attend(self, layer, q, k, v, key_padding_mask, scale)
        if self._batch is None:
            raise RuntimeError("call set_batch(groups=..., tokens=...) before each forward of the profiled model")
        self._calls[layer] = self._calls.get(layer, 0) + 1
        if self._calls[layer] > 1:
            raise RuntimeError(
                f"layer {layer!r} ran twice since the last set_batch: call set_batch before every forward "
                f"(a module that calls attention twice per forward is not supported)"
            )
        if q.requires_grad and not self._warned_grad:
            warnings.warn(
                "attnprof profiles forward passes only: the profiled attention output carries no gradient. "
                "Run the model under torch.inference_mode() (also faster).",
                stacklevel=3,
            )
            self._warned_grad = True
        labelings, _ = self._batch
        if labelings.shape[1] != q.shape[0]:
            raise ValueError(
                f"set_batch gave {labelings.shape[1]} group codes but layer {layer!r} sees a batch of {q.shape[0]} cells"
            )
        if self.n_heads is None:
            self.n_heads = q.shape[1]
        elif q.shape[1] != self.n_heads:
            raise ValueError(f"layer {layer!r} has {q.shape[1]} heads, others {self.n_heads}: mixed head counts")
        self.register(layer)
        try:
            plan = self._plan_for(q, key_padding_mask)
            out = planned_stats(q, k, v, plan, self._targets(layer, plan, q.device), scale=scale, backend=self.backend)
        except ValueError as e:  # name the layer: the kernels know none
            raise ValueError(f"layer {layer!r}: {e}") from e
        self._plan_layers.append(layer)  # in the order of the plan's NaN/Inf verdicts
        return out

    def _plan_for(self, q, key_padding_mask) -> BatchPlan:
        """The forward's batch plan, built at its first layer call and reused by the others (a layer
        with other padding, e.g. of another length, gets its own)."""
        plan, mask, version = self._plan or (None, None, None)
        same = plan is not None and plan.device == q.device and (plan.B, plan.L) == (q.shape[0], q.shape[2]) and (
            (mask is None and key_padding_mask is None)
            or (mask is not None and key_padding_mask is not None and _version(mask) == version and (
                # the adapters hand every layer of a forward the same mask object (see per_forward): no sync
                mask is key_padding_mask
                # a model that builds a new mask per layer: one comparison (a sync), still no new plan
                or torch.equal(mask, key_padding_mask)
            ))
        )  # fmt: skip
        if not same:
            self.check_finite()  # the verdicts of the calls on the plan that goes
            labelings, tokens = self._batch
            plan = build_plan(self.spec, labelings.to(q.device), key_padding_mask,
                              None if tokens is None else tokens.to(q.device),
                              shape=(q.shape[0], q.shape[2]), device=q.device)  # fmt: skip
        self._plan = (plan, key_padding_mask, None if key_padding_mask is None else _version(key_padding_mask))
        return plan

    def _targets(self, layer: str, plan: BatchPlan, device) -> list[Target]:
        if layer not in self.sums:  # tiled: one matmul adds all dense sums of a layer (see tiled_zeros)
            shapes = {k: (1, *s) for k, s in sum_shapes(self.spec, self.n_heads).items()}
            tiled = tiled_zeros(shapes, device=device, alloc=self._slot if device.type == "cpu" else None)
            self.sums[layer] = {k: v[0] for k, v in tiled.items()}
            self._views[layer] = (dict(self.sums[layer]), Target(tiled, slice(0, 1)))
        sums, (made_from, target) = self.sums[layer], self._views[layer]
        if made_from.keys() != sums.keys() or any(made_from[k] is not v for k, v in sums.items()):  # replaced
            target = Target({k: v[None] for k, v in sums.items()}, slice(0, 1))
            self._views[layer] = (dict(sums), target)
        return [target]

    def _slot(self, family: str, shape: tuple) -> torch.Tensor:
        """The next layer's zero buffer of one family on the CPU: a slot of one numpy array for every layer,
        allocated at the first call (its pages are the kernel's: untouched ones cost nothing), so the
        hand-over of a closed session takes the sums as they are, without a copy."""
        slot = len(self.sums)  # layers take slots in the order they first run
        if family not in self._store:
            store = np.zeros((max(self.capacity, 1), *shape))
            self._store[family] = store
            self._store_storage[family] = torch.from_numpy(store).untyped_storage()
        store = self._store[family]
        if slot >= len(store):  # more layers than the adapter named: this one apart (and copied at the hand-over)
            return torch.zeros(shape, dtype=torch.float64)
        # a tensor of its own on the slot's memory (no view of the store: each layer's sums have their own base,
        # as torch.compile's custom op needs)
        return torch.empty(0, dtype=torch.float64).set_(self._store_storage[family], slot * store[0].size, shape)

    def _stored_sums(self, layers: list[str]) -> dict[str, np.ndarray] | None:
        """Every sum of ``layers`` as a view of the CPU store (None unless each layer's sums are its slot in
        that order): ``[layers, G, ...]`` arrays that share the kernels' memory."""
        if not self._store:
            return None
        out = {}
        for name, t in self.sums[layers[0]].items():
            store = next((a for a in self._store.values()
                          if a[0].ctypes.data <= t.data_ptr() < a[0].ctypes.data + a[0].nbytes), None)  # fmt: skip
            if store is None:
                return None
            start = (t.data_ptr() - store.ctypes.data) // 8
            step = store[0].size
            for i, layer in enumerate(layers):  # slot i, same offset within it, same strides
                u = self.sums[layer][name]
                if u.data_ptr() != store.ctypes.data + 8 * (i * step + start) or u.stride() != t.stride():
                    return None
            elem = [8 * s for s in t.stride()]
            out[name] = np.lib.stride_tricks.as_strided(store.reshape(-1)[start:], (len(layers), *t.shape),
                                                        (8 * step, *elem), writeable=False)  # fmt: skip
        return out

    # ----------------------------------------------------------------- result
    def profile(self, meta: dict | None = None) -> Profile:
        """The sums so far as a :class:`Profile` (float64 numpy, layers first). During a session (a checkpoint)
        the profile gets a copy. Once the session has ended (``closed``) the profile takes the CPU store's memory
        as it is (no copy), or else each layer's buffers are freed as they are copied (the hand-over peaks at the
        sums plus one layer); the profile is kept: later calls return the same one."""
        if self._handed is not None:
            return self._handed
        if not self.sums:
            raise RuntimeError("nothing was profiled: no attention layer ran inside the profiling context")
        self.check_finite()
        layers = [layer for layer in self.layers if layer in self.sums]  # in the order they first ran
        sums = self._stored_sums(layers) if self.closed else None  # the closed session's memory, handed over
        if sums is None:
            sums = {name: np.empty((len(layers), *t.shape)) for name, t in self.sums[layers[0]].items()}
            for i, layer in enumerate(layers):
                for name, t in self.sums[layer].items():
                    sums[name][i] = t.cpu().numpy()
                if self.closed:
                    del self.sums[layer]
                    self._views.pop(layer, None)
        if self.closed:
            self.sums.clear()
            self._views.clear()
        profile = Profile(
            sums,
            layers=layers,
            groups=list(self.groups),
            n_heads=int(self.n_heads),
            window=self.spec.window,
            n_context=self.spec.n_context,
            genes=self.genes,
            panel=list(self.panel),
            meta=dict(meta or {}),
            blocks=self.blocks,
            map_length=self.spec.map_length,
        )
        if self.closed:
            self._handed = profile
        return profile


def _version(t: torch.Tensor) -> int | None:
    """The tensor's version counter (bumped by in-place changes); inference tensors have none (they are
    keyed by identity alone: a model does not rewrite its mask between layers of a forward)."""
    return None if t.is_inference() else t._version
