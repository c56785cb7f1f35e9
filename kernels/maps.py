"""Whole-context maps: each head's attention over the whole context, binned to a fixed grid.

Position i lies in bin ``i * NB // map_length`` (``StatsSpec.map_bins``, ``map_length``). Per cell, head,
query bin a and key bin c the map is ``m[a, c] = (1 / |R_a|) sum_{i in R_a} sum_{j real, bin(j) = c}
P[i, j]`` (R_a: the cell's real query rows in bin a): the mean mass a query in bin a puts on keys in bin
c, so a row of m sums to 1 over the bins. A cell counts for (a, c) when R_a is not empty and bin c holds a
real key; the group sums are ``map_sum``, ``map_sq`` (of the per-cell m) and ``map_count``.

How the backends reduce it: bins are runs of consecutive positions, and a cell's real tokens are packed in
position order, so the real keys of one bin are one contiguous range ``edges[b, c] .. edges[b, c + 1]`` of
the cell's packed keys, and likewise its real query rows. A backend sums each row of P over those ranges
while the row is in cache (the row's mass per key bin), adds the rows of each query bin together and hands
over those row sums; :func:`cell_maps` divides by |R_a|. Nothing here depends on q, k, v: the plan builds a
:class:`MapPlan` once per forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True, eq=False)
class MapPlan:
    """The binning of one batch (``B`` cells of ``L`` positions, ``C`` counted, ``T`` real tokens)."""

    bins: int  # NB
    pos_bin: torch.Tensor  # [B, L] int32: each position's bin, -1 at padding
    token_bin: torch.Tensor  # [T] int64: the bin of each packed real token (the plan's token order)
    edges: torch.Tensor  # [B, NB + 1] int64: where each bin starts among the cell's packed real tokens
    rows: torch.Tensor  # [C, NB] float64: real tokens of each counted cell per bin (|R_a|, and the keys)


def position_bins(spec, L: int, device) -> torch.Tensor:
    """``[L]`` int64: the bin of every position of a batch of length L. Positions >= map_length are padding
    (``check_batch`` refuses a real one there); they get the last bin here, which no real token reads."""
    pos = torch.arange(L, device=device)
    return (pos * spec.map_bins // spec.map_length).clamp(max=spec.map_bins - 1)


def build_maps(spec, real: torch.Tensor, counted: torch.Tensor) -> tuple[MapPlan, torch.Tensor]:
    """The batch's :class:`MapPlan` and each counted cell's map counts ``[C, NB * NB]`` float64 (1 where the
    cell counts for (a, c): both bins hold a real token, as query rows and keys are the same tokens)."""
    B, L = real.shape
    NB = spec.map_bins
    bin_of = position_bins(spec, L, real.device)
    per_bin = torch.zeros(B, NB, dtype=torch.long, device=real.device).index_add_(1, bin_of, real.long())
    edges = F.pad(per_bin.cumsum(1), (1, 0))
    pos_bin = torch.where(real, bin_of, -1).to(torch.int32)
    token_bin = bin_of.expand(B, L)[real]  # row-major, as the plan's token_index packs them
    rows = per_bin[counted].double()
    held = (rows > 0).double()
    counts = (held[:, :, None] * held[:, None, :]).reshape(counted.numel(), NB * NB)
    return MapPlan(NB, pos_bin, token_bin, edges, rows), counts


def cell_maps(plan, row_sums: torch.Tensor) -> torch.Tensor:
    """``[C, H, NB, NB]`` float64 per-cell maps m from ``row_sums [C, H, NB, NB]`` (per query bin a, the sum
    over its real rows of each row's mass per key bin c): divided by |R_a| (0 rows: the sums are 0 too)."""
    rows = plan.maps.rows.clamp(min=1)
    return row_sums.double() / rows[:, None, :, None]


def key_onehot(plan, b: int, dtype=torch.float32) -> torch.Tensor:
    """``[n, NB]`` one-hot of the key bins of cell b's packed real tokens (for the eager row blocks)."""
    cu, maps = plan.cache_cu(), plan.maps
    bins = torch.arange(maps.bins, device=maps.token_bin.device)
    return (maps.token_bin[cu[b] : cu[b + 1], None] == bins).to(dtype)
