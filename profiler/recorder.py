"""The profiling run's side of the model's attention layers: which block each cell counts in, the forward's
batch plan, and the hand-over of the sums to a :class:`Profile`.

Adapters call :meth:`Recorder.attend` from inside the model's attention layers; the caller says before each
forward which groups and tokens the batch has (:meth:`Recorder.set_batch`). The recorder talks to a batch
plan (:func:`~attnprof.kernels.build_plan`, once per forward) and an :class:`~attnprof.kernels.Accumulator`
(which owns the sums); no model knowledge and no math lives here.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Sequence

import numpy as np
import torch

from attnprof.kernels import Accumulator, BatchPlan, StatsSpec, build_plan

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
        self.accumulator: Accumulator | None = None  # made at the first layer call, when the head count is known
        self.capacity = 0  # attention modules the adapter swapped: the layers the CPU store has slots for
        self.n_heads: int | None = None
        self._batch = None
        self._calls: dict[str, int] = {}
        self._warned_grad = False
        # this forward's derived state, keyed by the mask tensors it came from: what per_forward derived from a
        # model's mask, and the batch plan built from a padding (see _remember)
        self._forward: dict = {}
        self.closed = False  # the session ended: profile() hands the sums over, freeing them as it goes
        self._handed: Profile | None = None  # the profile handed over after the session

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
        self.check_finite()  # the previous forward's verdict, before its plans go
        self._batch = (torch.as_tensor(codes)[None], None if tokens is None else torch.as_tensor(tokens))
        self._calls = {}
        self._forward = {}  # plans are built at the forward's first layer call, where padding and device are known

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
        return self._remember(mask, (derive, *args), lambda: derive(mask, *args))

    def _remember(self, tensor: torch.Tensor, key: tuple, make: Callable):
        """``make()``, kept for this forward under (the tensor, its version, ``key``). The weak reference rules
        out a reused id; a tensor changed in place has a new version, so it is derived again."""
        full = (id(tensor), _version(tensor), *key)
        hit = self._forward.get(full)
        if hit is not None and hit[0]() is tensor:
            return hit[1]
        value = make()
        self._forward[full] = (weakref.ref(tensor), value)
        return value

    def check_finite(self) -> None:
        """Raise if a layer call since the last check had NaN or Inf in q, k or v. The triton backend
        defers this verdict (it would wait for the device in every layer): one host sync per plan, taken
        once per forward (at the next set_batch and when the profile is read)."""
        if self.accumulator is not None:
            self.accumulator.check_finite()

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
        if self.accumulator is None:
            self.accumulator = Accumulator(self.spec, self.n_heads, backend=self.backend, layers=self.capacity)
        try:
            return self.accumulator.attend(layer, q, k, v, self._plan_for(q, key_padding_mask), scale)
        except ValueError as e:  # name the layer: the kernels know none
            raise ValueError(f"layer {layer!r}: {e}") from e

    def _plan_for(self, q, key_padding_mask) -> BatchPlan:
        """The forward's batch plan for this padding, built at its first layer call and reused by the others:
        the adapters hand every layer of a forward the same mask object (see per_forward), found with no op and
        no sync; a model that builds a new mask per layer costs one comparison (a sync), still no new plan. A
        layer with other padding (e.g. of another length) gets its own plan."""
        shape = (q.shape[0], q.shape[2], q.device)
        if key_padding_mask is None:
            key = ("plan", *shape)
            if key not in self._forward:
                self._forward[key] = (None, self._build_plan(q, None))
            return self._forward[key][1]

        def find_or_build():  # a plan built from the same memory is stale: that mask was changed in place
            for _, plan in self._forward.values():
                if (isinstance(plan, BatchPlan) and (plan.B, plan.L, plan.device) == shape
                        and plan.padding.data_ptr() != key_padding_mask.data_ptr()
                        and torch.equal(plan.padding, key_padding_mask)):  # fmt: skip
                    return plan
            return self._build_plan(q, key_padding_mask)

        return self._remember(key_padding_mask, ("plan", *shape), find_or_build)

    def _build_plan(self, q, key_padding_mask) -> BatchPlan:
        labelings, tokens = self._batch
        return build_plan(self.spec, labelings.to(q.device), key_padding_mask,
                          None if tokens is None else tokens.to(q.device),
                          shape=(q.shape[0], q.shape[2]), device=q.device)  # fmt: skip

    # ----------------------------------------------------------------- result
    def profile(self, meta: dict | None = None) -> Profile:
        """The sums so far as a :class:`Profile` (float64 numpy, layers first). During a session (a checkpoint)
        the profile gets a copy. Once the session has ended (``closed``) the profile takes the CPU store's memory
        as it is (no copy), or else each layer's buffers are freed as they are copied (the hand-over peaks at the
        sums plus one layer); the profile is kept: later calls return the same one."""
        if self._handed is not None:
            return self._handed
        if self.accumulator is None or not self.accumulator.layers:
            raise RuntimeError("nothing was profiled: no attention layer ran inside the profiling context")
        self.check_finite()
        layers = [layer for layer in self.layers if layer in self.accumulator]
        # labeling 0, the only one kept: a view, so a closed session's store is handed over as it is
        sums = {name: a[:, 0] for name, a in self.accumulator.to_numpy(layers, release=self.closed).items()}
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
