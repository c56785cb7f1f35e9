"""Per-cell reductions into group sums, shared by the ``torch`` and ``triton`` backends.

A backend reduces P over query rows per cell (the heavy part); these small
batched functions turn the per-cell results into the float64 group sums of
the contract. Group sums are one-hot matmuls, so the order is fixed.

Few ops per layer: a layer's results, their squares and the counts are
written into per-cell feature buffers of the plan (the counts once), so a
target whose sums share one buffer (:func:`tiled_zeros`, as the recorder
keeps them) takes one matmul for every dense sum and one matmul and
index_add per gene chunk, whatever the number of statistics.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass, field

import torch

from . import fused_rows
from .features import DENSE, GENES, CellResults, _Features, _layer_features, _part  # noqa: F401 (CellResults: public here too)


def panel_positions(toks, real, panel):
    """Where each cell holds panel ids: ``pos [C, M]`` (ascending, -1 past the cell's count) and
    ``member [C, K, M]`` (float64: panel id k sits at pos[c, m])."""
    member = (toks[:, None, :] == panel[None, :, None]) & real[:, None, :]  # [C, K, L]
    at = member.any(1)
    count = at.sum(1)
    M = int(count.max()) if count.numel() else 0
    pos = torch.argsort((~at).to(torch.uint8), dim=1, stable=True)[:, :M]  # panel positions first, in order
    has = torch.arange(M, device=pos.device) < count[:, None]
    m = member.gather(2, pos[:, None, :].expand(-1, panel.numel(), -1)) & has[:, None, :]
    return torch.where(has, pos, -1), m.double()


# ------------------------------------------------------------------ every labeling at once
@dataclass(eq=False)
class Target:
    """Where a layer's sums go: float64 tensors shaped ``[n, G, ...]`` (``sum_shapes`` with a leading
    labeling axis) for the plan's labelings ``labelings`` (a slice of n of them). A target without
    the ``*_sq`` sums gets none (a caller that needs only means keeps sums and counts).

    genes: ``[V_b]`` slot of each of ``plan.genes`` in the last axis of the ``recv_*`` sums; None when
    that axis is the whole vocabulary (slot = token id).

    The tiling is found once, when the target is made: ``dense`` is the ``[n G, F]`` matrix its dense sums
    fill side by side (DENSE order, as :func:`tiled_zeros` lays them out; one ``addmm`` adds them all), and
    ``gene_block`` the ``[n G, rows, V]`` block of its gene sums; None where they do not tile. A target's
    tensors are fixed for its life: sums in other tensors take a new Target.
    """

    sums: dict
    labelings: slice = field(default_factory=lambda: slice(None))
    genes: torch.Tensor | None = None
    dense_names: tuple = field(init=False, repr=False)
    dense: torch.Tensor | None = field(init=False, repr=False)
    gene_names: tuple = field(init=False, repr=False)
    gene_block: torch.Tensor | None = field(init=False, repr=False)

    def __post_init__(self):
        self.dense_names = tuple(k for k in DENSE if k in self.sums)
        self.dense = _tiled([self.sums[k] for k in self.dense_names]) if self.dense_names else None
        self.gene_names = tuple(k for k in GENES if k in self.sums)
        self.gene_block = None
        if self.gene_names and self.gene_names == GENES[: len(self.gene_names)]:  # sums, counts, squares: a prefix
            flat = _tiled([self.sums[k] for k in self.gene_names])
            if flat is not None:
                first = self.sums[self.gene_names[0]]  # [n, G, H, V]: rows H (+ 1 + H) of V genes
                rows = (2 * first.shape[2] + 1) if len(self.gene_names) == 3 else first.shape[2] + len(self.gene_names) - 1
                self.gene_block = flat.view(flat.shape[0], rows, first.shape[-1])


def received_pairs(plan, received: torch.Tensor) -> torch.Tensor:
    """``[U, H]`` per (cell, gene) pair from per-cell column means ``received [C, H, L]``."""
    C, H, L = received.shape
    flat = received.permute(0, 2, 1).reshape(C * L, H)[plan.gene_src]
    return received.new_zeros(plan.pair_cell.numel(), H).index_add_(0, plan.gene_pairs, flat)


def pair_means(plan, block: torch.Tensor) -> torch.Tensor:
    """``[C, H, K, K]`` from ``block [C, H, M, M]`` = P at each cell's panel positions: per cell, the
    mean over the query occurrences of u of the mass on all occurrences of v (0 unless both present)."""
    member = plan.panel_member
    rows_mean = member / member.sum(-1, keepdim=True).clamp(min=1)
    return torch.einsum("ckm,chmn,cln->chkl", rows_mean, block.double(), member)


def tiled_zeros(shapes: dict, device=None, alloc=None) -> dict:
    """Zero float64 sums, name -> ``shapes[name]`` (``[n, G, ...]``), laid out for the fast path of
    :func:`reduce_into`: the dense sums are views side by side in one ``[n, G, F]`` buffer (DENSE order),
    the gene sums in another, so one matmul per target adds every dense statistic and its counts, and
    one index_add every gene statistic. Any other layout works too, with more ops per layer.

    alloc: ``(family, shape) -> zero float64 tensor`` for each buffer (family ``"dense"`` or ``"genes"``);
    default ``torch.zeros`` on ``device``."""
    out = {}
    for family, order in (("dense", DENSE), ("genes", GENES)):
        names = [k for k in order if k in shapes]
        if names:
            n, G = shapes[names[0]][:2]
            widths = [math.prod(shapes[k][2:]) for k in names]
            shape = (n, G, sum(widths))
            buf = torch.zeros(shape, dtype=torch.float64, device=device) if alloc is None else alloc(family, shape)
            for k, a, w in zip(names, itertools.accumulate([0, *widths]), widths):
                out[k] = buf[:, :, a : a + w].view(shapes[k])
    return {k: out[k] for k in shapes}  # every sum is in DENSE or GENES


def _tiled(tensors) -> torch.Tensor | None:
    """The ``[n G, F]`` matrix whose columns the float64 ``[n, G, ...]`` tensors fill side by side, in
    order, with nothing else in it (as :func:`tiled_zeros` lays them out), or None if they do not."""
    first = tensors[0]
    n, G = first.shape[:2]
    widths = [math.prod(t.shape[2:]) for t in tensors]
    F, at = sum(widths), first.storage_offset()
    for t, w in zip(tensors, widths):
        want = (G * F, F, *_contiguous_strides(t.shape[2:]))
        if (
            t.dtype != torch.float64 or t.device != first.device or tuple(t.shape[:2]) != (n, G)
            or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() or t.storage_offset() != at
            or any(s != e for s, e, d in zip(t.stride(), want, t.shape) if d > 1)  # a size-1 dim is never stepped
        ):  # fmt: skip
            return None
        at += w
    return first.as_strided((n * G, F), (F, 1))  # from where the first sum starts


def _contiguous_strides(shape) -> tuple:
    strides = [1]
    for d in reversed(shape[1:]):
        strides.insert(0, strides[0] * d)
    return tuple(strides) if shape else ()


def reduce_into(plan, cells: CellResults, target: Target) -> None:
    """Add the per-cell results of one layer into ``target``'s labelings: one matmul of the labelings'
    one-hot with the layer's per-cell features (results, their counts and squares; fixed order).

    The features live in buffers of the plan (:func:`_features`; the counts written once per plan),
    written once per layer for every target. A target laid out by :func:`tiled_zeros` takes one
    ``addmm_`` for its dense sums and one matmul and ``index_add_`` (per gene chunk) for its gene sums;
    sums in separate tensors take one per statistic."""
    G = plan.n_groups
    lab = range(plan.n_labelings)[target.labelings]
    n = len(lab)
    if n == 0:
        return
    assert lab.step == 1, "target labelings must be a contiguous slice"
    present, onehot_t, _ = _present_rows(plan, lab.start, lab.stop)
    f = _layer_features(plan, cells)
    _add_dense(target, present, onehot_t, f, n * G)
    if f.genes:
        _add_genes(target, plan, present, onehot_t, f, n, G)


def _present_rows(plan, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, list]:
    """The rows of labelings ``start:stop``'s wide group axis that hold a counted cell of the batch, their
    ``[P, C]`` one-hot and the rows as a host list, once per plan: only those rows of a target's sums change, so the reduction writes
    ``P <= C`` rows whatever the number of groups (blocks: replicates x subsets can be hundreds)."""
    def make():
        G, host = plan.n_groups, plan.host["present"]
        lo, hi = bisect.bisect_left(host, start * G), bisect.bisect_left(host, stop * G)  # host ints: no sync
        rows = plan.present[lo:hi]  # labelings are contiguous in the wide axis
        return rows - start * G, plan.onehot.T.index_select(0, rows), [r - start * G for r in host[lo:hi]]

    return plan.derived(("present_rows", start, stop), make)


def _add_dense(target: Target, present, onehot_t, f: _Features, rows: int) -> None:
    """``sums[present] += onehot_t @ features`` for the target's dense sums: one matmul when they tile one
    buffer in the features' column order, else one per sum."""
    names = target.dense_names
    if target.dense is not None and names == tuple(f.cols)[: len(names)]:
        target.dense.index_add_(0, present, onehot_t @ f.prefix(len(names)))
        return
    for name in names:
        t, value = target.sums[name], f.cols[name]
        t_rows = _tiled([t])
        if t_rows is not None:
            t_rows.index_add_(0, present, onehot_t @ value)
        else:  # any other layout: rows (labeling, group) of the wide axis
            G = t.shape[1]
            t.index_put_((present // G, present % G), (onehot_t @ value).view(len(present), *t.shape[2:]),
                         accumulate=True)  # fmt: skip


def _add_genes(target: Target, plan, present, onehot_t, f: _Features, n: int, G: int) -> None:
    """Gene sums of the target's labelings: per gene chunk, one matmul with the present rows' one-hot and one
    scatter-add at (those rows, the target's gene slots) when its gene sums tile one block, else one per sum."""
    names = target.gene_names
    if not names:
        return
    H = f.summary.shape[1]
    height = {"recv_sum": H, "recv_count": 1, "recv_sq": H}
    rows = sum(height[k] for k in names)
    block = target.gene_block
    for g in f.genes:
        slots = _part(plan.genes if target.genes is None else target.genes, g.v0, g.v1)
        if block is not None:
            value = (onehot_t @ g.prefix(rows)).view(len(present), rows, g.v1 - g.v0)
            _scatter_add(block, present, slots, value)
            continue
        value = (onehot_t @ g.flat).view(len(present), 2 * H + 1, g.v1 - g.v0)
        for name, part in (("recv_sum", slice(0, H)), ("recv_count", H), ("recv_sq", slice(H + 1, None))):
            if name not in target.sums:
                continue
            t = target.sums[name]  # [n, G, (H,) V]
            try:
                _scatter_add(t.view(n * G, *t.shape[2:]), present, slots, value[:, part])
            except RuntimeError:  # strides that merge no (labeling, group) axis: row by row
                for i, r in enumerate(_present_rows(plan, *_labeling_range(target, plan))[2]):
                    t[r // G, r % G].index_add_(-1, slots, value[i, part])


def _labeling_range(target: Target, plan) -> tuple[int, int]:
    lab = range(plan.n_labelings)[target.labelings]
    return lab.start, lab.stop


def _scatter_add(t: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, value: torch.Tensor) -> None:
    """``t[rows, ..., slots] += value`` (``value``: [P, (middle,) slots]) in one op: each (row, slot) once, so
    no entry is added to twice (no float atomics racing on a GPU). On the CPU the fused extension's
    :func:`~.fused_rows.scatter_rows_add` when built (the same sums on every thread: ``index_put_`` with
    ``accumulate`` runs on one there, and so do the page faults of a fresh store's first touch)."""
    if t.device.type == "cpu" and t.dim() in (2, 3) and fused_rows.available():
        if t.dim() == 2:
            t, value = t.unsqueeze(1), value.unsqueeze(1)
        fused_rows.scatter_rows_add(t, rows, slots, value)
        return
    middle = t.dim() - 2
    index = [rows.view(-1, *[1] * (middle + 1))]
    index += [torch.arange(t.shape[1 + i], device=t.device).view(-1, *[1] * (middle - i)) for i in range(middle)]
    t.index_put_((*index, slots), value, accumulate=True)
