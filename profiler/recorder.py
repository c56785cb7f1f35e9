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

from .profile import NullSums, Profile


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
    ):
        self.groups = [str(g) for g in groups]
        if len(set(self.groups)) != len(self.groups):
            raise ValueError(f"group names must be unique, got {self.groups}")
        if isinstance(genes, int):
            genes = [str(i) for i in range(genes)]
        self.genes = None if genes is None else [str(g) for g in genes]
        self.panel = self._panel_ids(panel or [])
        self.spec = StatsSpec(
            n_groups=len(self.groups),
            window=window,
            vocab_size=None if self.genes is None else len(self.genes),
            panel=tuple(self.panel),
            n_context=n_context,
        )
        self.backend = backend
        self.layers: list[str] = []
        self.sums: dict[str, dict[str, torch.Tensor]] = {}
        self.n_heads: int | None = None
        self._batch = None
        self._calls: dict[str, int] = {}
        self._warned_grad = False
        self.n_null: int | None = None
        # layer -> name -> [N, G, ...]: every permutation's sums, gene sums over null_genes only
        self.null_sums: dict[str, dict[str, torch.Tensor]] = {}
        self.null_genes: list[int] = []  # token ids of the permutation sums' gene axis, first seen first
        self._null_slot: dict[int, int] = {}
        self._null_slots = None
        self._plan = None  # (plan, padding mask it was built from, that mask's version)
        self._plan_layers: list[str] = []  # layers called on the plan, in call order (its NaN/Inf verdicts)
        self._derived: dict = {}  # per_forward's results for this forward
        # layer -> (its sums as the Target was made from them, the Target: views with a labeling axis, made once);
        # (layer, "null") -> the permutations' Target
        self._views: dict = {}
        self.closed = False  # the session ended: profile() may hand the sums over without a copy

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

    def set_batch(self, groups, tokens=None, null_groups=None) -> None:
        """Say which group each cell of the next forward belongs to, and its token ids [B, L].

        null_groups: optional list of N further labelings of the same cells (label
        permutations); each gets its own sums, for permutation p-values, from the same
        attention pass. Every batch of a run must give the same N.
        """
        codes = self.group_codes(groups)
        if self.genes is not None and tokens is None:
            raise ValueError("gene statistics are on (genes= was given): pass tokens= with the batch's token ids")
        null = [self.group_codes(g) for g in (null_groups or [])]
        if any(n.shape != codes.shape for n in null):
            raise ValueError("every labeling in null_groups must have one code per cell of the batch")
        if self.n_null is not None and len(null) != self.n_null:
            raise ValueError(f"this run has {self.n_null} null labelings per batch; set_batch gave {len(null)}")
        self.n_null = len(null)
        labelings = torch.stack([codes, *null]) if null else codes[None]
        self.check_finite()  # the previous forward's verdict, before its plan goes
        self._batch = (labelings, None if tokens is None else torch.as_tensor(tokens))
        self._plan = None  # built at the forward's first layer call, where padding and device are known
        self._calls = {}
        self._derived = {}

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
        if torch.compiler.is_compiling():  # one opaque custom op for torch.compile (attnprof.kernels.custom_op)
            from attnprof.kernels.custom_op import compiled_attend

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
            self._null_slots = self._grow_null_genes(plan) if self.n_null else None
        self._plan = (plan, key_padding_mask, None if key_padding_mask is None else _version(key_padding_mask))
        return plan

    def _targets(self, layer: str, plan: BatchPlan, device) -> list[Target]:
        if layer not in self.sums:  # tiled: one matmul adds all dense sums of a layer (see tiled_zeros)
            shapes = {k: (1, *s) for k, s in sum_shapes(self.spec, self.n_heads).items()}
            tiled = tiled_zeros(shapes, device=device)
            self.sums[layer] = {k: v[0] for k, v in tiled.items()}
            self._views[layer] = (dict(self.sums[layer]), Target(tiled, slice(0, 1)))
        sums, (made_from, target) = self.sums[layer], self._views[layer]
        if made_from.keys() != sums.keys() or any(made_from[k] is not v for k, v in sums.items()):  # replaced
            target = Target({k: v[None] for k, v in sums.items()}, slice(0, 1))
            self._views[layer] = (dict(sums), target)
        targets = [target]
        if self.n_null:
            if layer not in self.null_sums:
                self.null_sums[layer] = self._empty_null(device)
            null = self._views.get((layer, "null"))
            if null is None or null.sums is not self.null_sums[layer] or null.genes is not self._null_slots:
                kept = {} if null is None else null.flat  # its views stay valid while its tensors do
                null = Target(self.null_sums[layer], slice(1, None), self._null_slots, flat=kept)
                self._views[layer, "null"] = null
            targets.append(null)
        return targets

    def _empty_null(self, device) -> dict[str, torch.Tensor]:
        """A layer's sums of every permutation, only what permutation p-values need: sums and counts
        (they compare differences of means; no sums of squares), gene sums over the ids seen so far."""
        shapes = {k: s for k, s in sum_shapes(self.spec, self.n_heads).items() if not k.endswith("_sq")}
        if self.genes is not None:
            V = len(self.null_genes)
            shapes.update(recv_sum=shapes["recv_sum"][:-1] + (V,), recv_count=shapes["recv_count"][:-1] + (V,))
        return tiled_zeros({k: (self.n_null, *s) for k, s in shapes.items()}, device=device)

    def _grow_null_genes(self, plan: BatchPlan) -> torch.Tensor | None:
        """Slots of the batch's genes in the permutation sums' gene axis, which grows (appends) by the
        ids not seen before: a labeling keeps gene sums only over the ids the data holds."""
        if self.genes is None:
            return None
        ids = plan.genes.tolist()
        new = [t for t in ids if t not in self._null_slot]
        for t in new:
            self._null_slot[t] = len(self.null_genes)
            self.null_genes.append(t)
        if new:  # a new gene block (still tiled), the old sums copied into its first slots
            for sums in self.null_sums.values():
                old = {name: sums[name] for name in ("recv_sum", "recv_count")}
                shapes = {name: (*t.shape[:-1], len(self.null_genes)) for name, t in old.items()}
                sums.update(tiled_zeros(shapes, device=old["recv_sum"].device))
                for name, t in old.items():
                    sums[name][..., : t.shape[-1]] = t
        return torch.tensor([self._null_slot[t] for t in ids], dtype=torch.long, device=plan.device)

    # ----------------------------------------------------------------- result
    def profile(self, meta: dict | None = None) -> Profile:
        if not self.sums:
            raise RuntimeError("nothing was profiled: no attention layer ran inside the profiling context")
        self.check_finite()
        layers = [layer for layer in self.layers if layer in self.sums]  # in the order they first ran

        def stacked(sums):
            return {
                name: torch.stack([sums[layer][name] for layer in layers]).cpu().numpy()
                for name in sums[layers[0]]
            }

        vocab = None if self.genes is None else len(self.genes)
        null = NullSums({}, vocab_size=vocab)
        if self.null_sums:
            # after the session the sums are handed over as they are (no copy of N labelings);
            # during it (a checkpoint) the profile gets its own copy
            own = (lambda t: t.numpy()) if self.closed else (lambda t: t.cpu().numpy().copy())
            layered = {name: [own(self.null_sums[layer][name].cpu()) for layer in layers]
                       for name in self.null_sums[layers[0]]}  # fmt: skip
            genes = None
            if self.genes is not None:  # the gene axis in ascending token ids
                order = np.argsort(self.null_genes, kind="stable")
                genes = np.asarray(self.null_genes, dtype=np.int64)[order]
                if not np.array_equal(order, np.arange(len(order))):
                    for name in ("recv_sum", "recv_count"):
                        layered[name] = [a[..., order] for a in layered[name]]
            null = NullSums(layered, genes=genes, vocab_size=vocab)
        return Profile(
            stacked(self.sums),
            layers=layers,
            groups=list(self.groups),
            n_heads=int(self.n_heads),
            window=self.spec.window,
            n_context=self.spec.n_context,
            genes=self.genes,
            panel=list(self.panel),
            meta=dict(meta or {}),
            null=null,
        )


def _version(t: torch.Tensor) -> int | None:
    """The tensor's version counter (bumped by in-place changes); inference tensors have none (they are
    keyed by identity alone: a model does not rewrite its mask between layers of a forward)."""
    return None if t.is_inference() else t._version
