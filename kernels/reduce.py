"""Per-cell reductions into group sums, shared by the ``torch`` and ``triton`` backends.

A backend reduces P over query rows per cell (the heavy part); these small
batched functions turn the per-cell results into the float64 group sums of
the contract. Group sums are one-hot matmuls, so the order is fixed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


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
@dataclass
class CellResults:
    """A backend's per-cell results of one layer, one row per counted cell of the plan.

    summary: ``[C, H, 4]`` the head summaries (means over the cell's real rows), SUMMARIES order.
    window:  ``[C, H, W, W]`` P among positions < W (W = plan.window), 0 unless both are real.
    received: ``[U, H]`` per (cell, gene) pair of the plan (``plan.pair_cell/pair_gene``): the sum
             over the cell's occurrences of the gene of the column mean of P; None without genes.
    pair:    ``[C, H, K, K]`` the cell's panel pair means (see :func:`pair_means`); None without a panel.
    """

    summary: torch.Tensor
    window: torch.Tensor
    received: torch.Tensor | None = None
    pair: torch.Tensor | None = None
    shared: dict = field(default_factory=dict, repr=False)  # derived once per layer for every target


@dataclass
class Target:
    """Where a layer's sums go: float64 tensors shaped ``[n, G, ...]`` (``sum_shapes`` with a leading
    labeling axis) for the plan's labelings ``labelings`` (a slice of n of them). A target without
    the ``*_sq`` sums gets none (the permutation nulls need only sums and counts).

    genes: ``[V_b]`` slot of each of ``plan.genes`` in the last axis of the ``recv_*`` sums; None when
    that axis is the whole vocabulary (slot = token id).
    """

    sums: dict
    labelings: slice = field(default_factory=lambda: slice(None))
    genes: torch.Tensor | None = None
    flat: dict = field(default_factory=dict, repr=False)  # name -> (sum, its [n G, F] view), made on first use

    def rows(self, name: str, n_rows: int) -> torch.Tensor | None:
        """``sums[name]`` as ``[n G, F]`` (a view, kept while that tensor stays), None if not contiguous."""
        t = self.sums[name]
        kept = self.flat.get(name)
        if kept is None or kept[0] is not t:
            kept = self.flat[name] = (t, t.view(n_rows, -1) if t.is_contiguous() else None)
        return kept[1]


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


def reduce_into(plan, cells: CellResults, target: Target) -> None:
    """Add the per-cell results of one layer into ``target``'s labelings: one matmul of the
    labelings' one-hot per statistic (fixed order), the counts from the plan.

    What does not depend on the layer (the one-hot's and the counts' slices for the target's
    labelings, the gene chunks' indices) is taken from ``plan.cache``; what does not depend on the
    target (the results in float64, their squares, the dense gene blocks) from ``cells.shared``."""
    G = plan.n_groups
    lab = range(plan.n_labelings)[target.labelings]
    n = len(lab)
    if n == 0:
        return
    assert lab.step == 1, "target labelings must be a contiguous slice"
    onehot_t, counts = _labelings(plan, lab.start, lab.stop)
    sums = target.sums
    W = plan.window
    for name, value in counts.items():
        if name == "recv_count":
            _gene_add(sums[name], target.genes, plan, value)
        else:
            sums[name] += value
    _addmm(sums, "summary", onehot_t, cells.summary, n, G, cells.shared, target)
    if W == plan.spec.window:
        _addmm(sums, "pos", onehot_t, cells.window, n, G, cells.shared, target)
    else:  # a batch shorter than the window: its [W, W] corner
        part = {k: sums[k][:, :, :, :W, :W] for k in ("pos_sum", "pos_sq") if k in sums}
        _addmm(part, "pos", onehot_t, cells.window, n, G, cells.shared)
    if cells.pair is not None:
        _addmm(sums, "pair", onehot_t, cells.pair, n, G, cells.shared, target)
    if cells.received is not None and plan.genes.numel():
        _add_received(sums, target.genes, plan, onehot_t, cells.received, n, G, cells.shared)


def _labelings(plan, start: int, stop: int):
    """``[n G, C]`` one-hot of labelings ``start:stop`` and their counts, sliced once per plan."""
    key = ("labelings", start, stop)
    if key not in plan.cache:
        G = plan.n_groups
        onehot_t = plan.onehot[:, start * G : stop * G].T  # labelings are contiguous in the wide axis
        plan.cache[key] = onehot_t, {name: value[start:stop] for name, value in plan.counts.items()}
    return plan.cache[key]


def _addmm(sums, name, onehot_t, x, n, G, shared, target=None):
    """``sums[name_sum/_sq] += onehot_t @ x, x**2`` over the cells (x: ``[C, ...]``)."""
    for suffix in ("_sum", "_sq"):
        if name + suffix not in sums:  # a target may keep no sums of squares (permutation nulls)
            continue
        value = _flat(shared, name, suffix, x)
        t = sums[name + suffix]
        rows = target.rows(name + suffix, n * G) if target is not None else None
        if rows is not None:
            rows.addmm_(onehot_t, value)
        elif t.is_contiguous():
            t.view(n * G, -1).addmm_(onehot_t, value)
        else:
            t += (onehot_t @ value).view(t.shape)


def _flat(shared, name, suffix, x):
    """``x`` as ``[C, F]`` float64 (``_sum``) or its square (``_sq``), once per layer for every target."""
    if (name, suffix) not in shared:
        if (name, "_sum") not in shared:
            shared[name, "_sum"] = x.reshape(x.shape[0], math.prod(x.shape[1:])).double()
        if suffix == "_sq":
            shared[name, "_sq"] = shared[name, "_sum"] * shared[name, "_sum"]
    return shared[name, suffix]


def _part(t, a: int, b: int):
    """``t[a:b]``, without an op when that is all of t."""
    return t if (a, b) == (0, t.shape[0]) else t[a:b]


#: Most per-cell gene entries (cells x genes x heads) densified at once by the gene reduction.
GENE_CHUNK = 2**22


def _add_received(sums, genes, plan, onehot_t, r, n, G, shared):
    """Gene sums of every labeling: the per-pair values densified per cell over the batch's genes
    (in chunks of genes), one matmul with the one-hot, then added at the target's gene slots."""
    C, H = plan.onehot.shape[0], r.shape[1]
    step = max(1, GENE_CHUNK // max(C * H, 1))
    for i, (v0, v1, cell, gene, a, b) in enumerate(_gene_chunks(plan, step)):
        for suffix in ("_sum", "_sq") if "recv_sq" in sums else ("_sum",):
            if ("recv", i, "_sum") not in shared:  # [C, (v1 - v0) H], once per layer for every target
                dense = r.new_zeros(C, H, v1 - v0, dtype=torch.float64)  # the sums' [H, V] order
                dense[cell, :, gene] = _part(r, a, b).double()
                shared["recv", i, "_sum"] = dense.view(C, H * (v1 - v0))
            if suffix == "_sq" and ("recv", i, "_sq") not in shared:
                shared["recv", i, "_sq"] = shared["recv", i, "_sum"] * shared["recv", i, "_sum"]
            value = shared["recv", i, suffix]
            block = (onehot_t @ value).view(n, G, H, v1 - v0)
            sums["recv" + suffix].index_add_(3, _part(plan.genes if genes is None else genes, v0, v1), block)


def _gene_chunks(plan, step: int) -> list:
    """Per chunk of ``step`` genes: ``(v0, v1, pair cells, pair genes - v0, first pair, end pair)``, once
    per plan (pairs are sorted by gene: a chunk of genes is a range of pairs)."""
    key = ("gene_chunks", step)
    if key not in plan.cache:
        V = plan.genes.numel()
        edges = torch.arange(0, V + step, step, device=plan.device).clamp(max=V)
        bounds = torch.searchsorted(plan.pair_gene, edges).tolist()
        chunks = []
        for i, v0 in enumerate(range(0, V, step)):
            a, b = bounds[i], bounds[i + 1]
            chunks.append((v0, min(V, v0 + step), _part(plan.pair_cell, a, b), _part(plan.pair_gene, a, b) - v0, a, b))
        plan.cache[key] = chunks
    return plan.cache[key]


def _gene_add(target, genes, plan, value):
    target.index_add_(target.dim() - 1, plan.genes if genes is None else genes, value)
