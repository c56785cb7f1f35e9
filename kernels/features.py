"""The per-cell feature buffers a reduction multiplies by the one-hot of the groups.

A layer's per-cell results, their squares and the counts are written into buffers of the plan (the counts
once per plan), laid out in the column order of the tiled sums (DENSE, then GENES per chunk of genes), so one
matmul adds every dense statistic of a target and one per gene chunk its gene statistics.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from .spec import SUMMARIES

#: Column order of the per-cell features of a layer and of a target's dense sums when they share one
#: buffer (:func:`tiled_zeros`): the sums, the counts, then the squares, so that a target without sums
#: of squares takes a prefix of the columns.
DENSE = ("summary_sum", "pos_sum", "pair_sum", "map_sum", "cells", "pos_count", "pair_count", "map_count",
         "summary_sq", "pos_sq", "pair_sq", "map_sq")
#: The same for the gene sums (rows H, 1, H of a gene block ``[n, G, 2H + 1, V]``).
GENES = ("recv_sum", "recv_count", "recv_sq")


@dataclass
class CellResults:
    """A backend's per-cell results of one layer, one row per counted cell of the plan.

    summary: ``[C, H, 4]`` the head summaries (means over the cell's real rows), SUMMARIES order.
    window:  ``[C, H, W, W]`` P among positions < W (W = plan.window), 0 unless both are real.
    received: ``[U, H]`` per (cell, gene) pair of the plan (``plan.pair_cell/pair_gene``): the sum
             over the cell's occurrences of the gene of the column mean of P; None without genes.
    pair:    ``[C, H, K, K]`` the cell's panel pair means (see :func:`pair_means`); None without a panel.
    received_tokens: instead of ``received``, ``[C L, H]`` float32 per counted cell and position (the
             column means as the triton column pass writes them): the reduction adds each token straight
             into its (cell, gene) feature (no ``[U, H]`` detour).
    map:     ``[C, H, NB, NB]`` the cell's whole-context map m (see :mod:`.maps`); None without maps.
    """

    summary: torch.Tensor
    window: torch.Tensor
    received: torch.Tensor | None = None
    pair: torch.Tensor | None = None
    received_tokens: torch.Tensor | None = None
    map: torch.Tensor | None = None
    shared: dict = field(default_factory=dict, repr=False)  # written once per layer for every target (the features)



@dataclass(eq=False)
class _GeneChunk:
    """A chunk ``v0:v1`` of the batch's genes: its pairs ``a:b`` (cells, genes - v0) and features
    ``x [C, 2H + 1, v1 - v0]``: the per-cell gene values, the genes present (1/0, set once), the squares."""

    v0: int
    v1: int
    cell: torch.Tensor
    gene: torch.Tensor
    a: int
    b: int
    x: torch.Tensor
    views: dict = field(default_factory=dict)

    def __post_init__(self):
        H = (self.x.shape[1] - 1) // 2
        self.dense, self.square = self.x[:, :H], self.x[:, H + 1 :]
        self.flat = self.x.view(self.x.shape[0], -1)

    def token_destinations(self, plan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(src, dest, flat)``, once per plan: the chunk's tokens as indices into a ``[C L, H]`` array of
        per-position values (``plan.gene_src``), ``dest [T, H]``: where each (token, head) value adds in
        ``flat`` = ``x.view(-1)`` (its cell, head row and gene column)."""
        if "tokens" not in self.views:
            pairs = plan.gene_pairs
            chosen = None  # every token (one chunk), else those of the chunk's pairs (once per plan: a sync)
            if (self.a, self.b) != (0, plan.pair_cell.numel()):
                chosen = ((pairs >= self.a) & (pairs < self.b)).nonzero().flatten()
            src = plan.gene_src if chosen is None else plan.gene_src[chosen]
            pair = pairs if chosen is None else pairs[chosen]
            C, rows, width = self.x.shape
            H = (rows - 1) // 2
            cell = src // plan.L
            slot = plan.pair_gene[pair] - self.v0
            heads = torch.arange(H, device=src.device) * width
            dest = (cell * rows * width + slot)[:, None] + heads[None, :]
            self.views["tokens"] = (src, dest, self.x.view(-1))
        return self.views["tokens"]

    def prefix(self, rows: int) -> torch.Tensor:
        """``[C, rows (v1 - v0)]``: the features of the first ``rows`` rows (a view, made once)."""
        if rows not in self.views:
            self.views[rows] = self.flat[:, : rows * (self.v1 - self.v0)]
        return self.views[rows]


@dataclass(eq=False)
class _Features:
    """A plan's per-cell features for the layers' sums: ``x [C, F]`` float64 in DENSE order (columns
    ``cols[name]``; the counts set once), views to write a layer's results into, the gene chunks."""

    x: torch.Tensor
    cols: dict
    summary: torch.Tensor  # [C, H, 4]
    window: torch.Tensor  # [C, H, W, W]: the plan's window in the spec's [W', W'] (zero elsewhere)
    pair: torch.Tensor | None  # [C, H, K, K]
    map: torch.Tensor | None  # [C, H, NB, NB]
    sums: torch.Tensor  # the columns of the *_sum features ...
    squares: torch.Tensor  # ... and of their squares (the same order)
    genes: list
    views: dict = field(default_factory=dict)

    def prefix(self, n_names: int) -> torch.Tensor:
        """The columns of the first ``n_names`` features (a view, made once)."""
        if n_names not in self.views:
            names = list(self.cols)[:n_names]
            self.views[n_names] = self.x[:, : sum(self.cols[k].shape[1] for k in names)]
        return self.views[n_names]


def _features(plan, H: int) -> _Features:
    """The plan's feature buffers for H heads, made at its first layer call."""
    return plan.derived(("features", H), lambda: _make_features(plan, H))


def _make_features(plan, H: int) -> _Features:
    spec, C = plan.spec, plan.n_counted
    W, K, S, NB = spec.window, len(spec.panel), len(SUMMARIES), spec.map_bins
    widths = {"summary_sum": H * S, "pos_sum": H * W * W, "cells": 1, "pos_count": W * W}
    if K:
        widths.update(pair_sum=H * K * K, pair_count=K * K)
    if NB:
        widths.update(map_sum=H * NB * NB, map_count=NB * NB)
    widths.update({k[:-4] + "_sq": w for k, w in widths.items() if k.endswith("_sum")})
    names = [k for k in DENSE if k in widths]
    x = torch.zeros(C, sum(widths.values()), dtype=torch.float64, device=plan.device)
    cols = {k: x[:, a : a + widths[k]] for k, a in zip(names, itertools.accumulate([0, *map(widths.get, names)]))}
    for k in ("cells", "pos_count", "pair_count", "map_count"):
        if k in cols:
            cols[k].copy_(plan.cell_counts[k])
    n_sums = sum(w for k, w in widths.items() if k.endswith("_sum"))  # the first columns; squares the last
    w = plan.window
    return _Features(
        x=x, cols=cols, summary=cols["summary_sum"].view(C, H, S),
        window=cols["pos_sum"].view(C, H, W, W)[:, :, :w, :w],
        pair=cols["pair_sum"].view(C, H, K, K) if K else None, map=cols["map_sum"].view(C, H, NB, NB) if NB else None,
        sums=x[:, :n_sums], squares=x[:, x.shape[1] - n_sums :], genes=_gene_features(plan, H),
    )  # fmt: skip


#: Most per-cell gene entries (cells x genes x heads) of one chunk of the gene reduction's features.
GENE_CHUNK = 2**22


def _gene_features(plan, H: int) -> list:
    """Per chunk of the batch's genes: its :class:`_GeneChunk` (none without gene statistics)."""
    if not plan.spec.gene_stats or not plan.genes.numel():
        return []
    C = plan.n_counted
    step = max(1, GENE_CHUNK // max(C * H, 1))
    present = plan.cell_counts["recv_count"]
    chunks = []
    for v0, v1, cell, gene, a, b in _gene_chunks(plan, step):
        # float64, like the dense features: a cell's value and its square are exact, so the run sums do not
        # depend on how the cells were batched (shards and subsets merge to the whole run to ~1e-16,
        # tests/test_merge.py); float32 accumulation per batch would make that ~1e-7 (docs/gpu.md, section 4)
        x = torch.zeros(C, 2 * H + 1, v1 - v0, dtype=torch.float64, device=plan.device)
        x[:, H] = present[:, v0:v1]
        chunks.append(_GeneChunk(v0, v1, cell, gene, a, b, x))
    return chunks


def _layer_features(plan, cells: CellResults) -> _Features:
    """The plan's features holding this layer's results, written once per layer for every target."""
    f = cells.shared.get("features")
    if f is None:
        f = cells.shared["features"] = _features(plan, cells.summary.shape[1])
        f.summary.copy_(cells.summary)  # float64, exactly
        f.window.copy_(cells.window)
        if f.pair is not None:
            f.pair.copy_(cells.pair)
        if f.map is not None:
            f.map.copy_(cells.map)
        torch.mul(f.sums, f.sums, out=f.squares)
        for g in f.genes:
            if cells.received_tokens is not None:  # each token's value added at its (cell, gene): repeats sum up
                src, dest, flat = g.token_destinations(plan)
                g.dense.zero_()
                flat.index_put_((dest,), cells.received_tokens.index_select(0, src).double(), accumulate=True)
            else:  # a plan writes the same (cell, gene) entries in every layer: the rest stays 0
                g.dense[g.cell, :, g.gene] = _part(cells.received, g.a, g.b).double()  # the sums' [H, V] order
            torch.mul(g.dense, g.dense, out=g.square)
    return f


def _gene_chunks(plan, step: int) -> list:
    """Per chunk of ``step`` genes: ``(v0, v1, pair cells, pair genes - v0, first pair, end pair)``, once
    per plan (pairs are sorted by gene: a chunk of genes is a range of pairs)."""
    def make():
        V = plan.genes.numel()
        edges = torch.arange(0, V + step, step, device=plan.device).clamp(max=V)
        bounds = torch.searchsorted(plan.pair_gene, edges).tolist()
        chunks = []
        for i, v0 in enumerate(range(0, V, step)):
            a, b = bounds[i], bounds[i + 1]
            chunks.append((v0, min(V, v0 + step), _part(plan.pair_cell, a, b), _part(plan.pair_gene, a, b) - v0, a, b))
        return chunks

    return plan.derived(("gene_chunks", step), make)


def _part(t, a: int, b: int):
    """``t[a:b]``, without an op when that is all of t."""
    return t if (a, b) == (0, t.shape[0]) else t[a:b]
