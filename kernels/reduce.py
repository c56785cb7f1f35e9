"""Per-cell reductions into group sums, shared by the ``torch`` and ``triton`` backends.

A backend reduces P over query rows per cell (the heavy part); these small
batched functions turn the per-cell results into the float64 group sums of
the contract. Group sums are one-hot matmuls, so the order is fixed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def group_onehot(groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """``[C, G]`` float64 membership of the counted cells (codes >= 0)."""
    return F.one_hot(groups, n_groups).double()


def add_group_sums(sums, name: str, onehot, x) -> None:
    """``{name}_sum/_sq[g] += sum over the cells c of g of x[c], x[c]**2`` (first axis of x: cells)."""
    x = x.double()
    sums[f"{name}_sum"] += torch.einsum("cg,c...->g...", onehot, x)
    sums[f"{name}_sq"] += torch.einsum("cg,c...->g...", onehot, x * x)


def add_window_counts(sums, onehot, real, W: int) -> None:
    """``pos_count[g, i, j]``: cells of g where positions i and j (< W) are both real tokens."""
    both = real[:, :W].double()
    sums["pos_count"][:, :W, :W] += torch.einsum("cg,ci,cj->gij", onehot, both, both)


def add_received(sums, groups, toks, real, received, V: int) -> None:
    """Scatter per-cell column means ``received [C, H, L]`` by token id.

    Occurrences of an id in one cell sum; the cell counts once for that id.
    """
    H = received.shape[1]
    received = received.double()
    cell, pos = real.nonzero(as_tuple=True)
    ids, inverse = (cell * V + toks[cell, pos]).unique(return_inverse=True)  # one per (cell, id) present
    r = received.new_zeros(H, ids.numel()).index_add_(1, inverse, received[cell, :, pos].T)
    group, token = groups[ids // V], ids % V
    # straight into the [G, H, V] sums: work in proportion to the ids present, not to V
    slot = ((group * H)[None, :] + torch.arange(H, device=r.device)[:, None]) * V + token[None, :]
    sums["recv_sum"].view(-1).index_add_(0, slot.ravel(), r.ravel())
    sums["recv_sq"].view(-1).index_add_(0, slot.ravel(), (r * r).ravel())
    sums["recv_count"].view(-1).index_add_(0, group * V + token, torch.ones_like(r[0]))


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


def add_pairs(sums, onehot, member, block) -> None:
    """Pair sums from ``block [C, H, M, M]`` = P at each cell's panel positions.

    Per cell: mean over the query occurrences of u of the mass on all occurrences of v.
    """
    rows_mean = member / member.sum(-1, keepdim=True).clamp(min=1)
    pair = torch.einsum("ckm,chmn,cln->chkl", rows_mean, block.double(), member)  # 0 unless both ids are present
    add_group_sums(sums, "pair", onehot, pair)
    present = (member.sum(-1) > 0).double()
    sums["pair_count"] += torch.einsum("cg,ck,cl->gkl", onehot, present, present)
