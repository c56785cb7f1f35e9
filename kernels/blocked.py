"""The fast CPU path (runs on CUDA too): exact softmax in row blocks, on a batch plan.

Keys are compacted to each cell's real tokens, so no mask is needed and padded keys cost nothing.
A full row of keys fits in cache, so each block of scores is computed once and shared by the exact
softmax, ``P @ V`` and the row and column reductions. On CPU the whole batch is one call of a
compiled kernel (:func:`.fused_rows.batch_rows`): the loop over cells and heads, the padded rows'
output (over the real keys), the head summaries and the window and panel entries all run inside it,
so a layer costs a handful of tensor ops whatever the batch size. The eager per-cell row-block loop
is the fallback (no compiler, small cells) and the CUDA path.

Backends return per-cell results (:class:`.reduce.CellResults`); :func:`.reduce.reduce_into` turns
them into the group sums of every labeling of the plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import fused_rows
from .maps import cell_maps, key_onehot
from .plan import BatchPlan, build_plan
from .reduce import CellResults, Target, pair_means, received_pairs, reduce_into
from .spec import Inputs, StatsSpec, empty_sums, refuse_non_finite

#: The fused kernel pays off (and is built, once) only for cells with at least this many scores
#: (heads x tokens^2); smaller cells, e.g. of demo-sized models, stay on the eager loop.
FUSED_MIN_SCORES = 2**18

#: Scores per eager block (heads x rows x keys): 2**20 fp32 = 4 MiB (measured fastest here).
BLOCK_ELEMS = 2**20


@dataclass(frozen=True, eq=False)
class BatchRows:
    """The torch backend's view of a plan: where every query row and packed token of the whole batch is, as the
    fused batch kernel takes them (derived once per plan by :func:`batch_rows`)."""

    cu_q: torch.Tensor  # [B + 1] int64: each cell's L query rows start at b L
    q_rows: torch.Tensor  # [B L] int64 flat index b L + position of every query row, each cell's real positions
    #                       first (ascending), then its padded ones (they get an output too, over the real keys)
    k_rows: torch.Tensor  # [T] int64 flat index b L + position of every packed real token
    token_cell: torch.Tensor  # [T] int64 the cell of each packed real token
    counted_slot: torch.Tensor  # [B] int64 each cell's index among the counted cells, -1 if not counted
    n_window: torch.Tensor  # [B] int64 real positions < W per batch row (0 for uncounted cells)
    n_context: torch.Tensor  # [B] int64 real positions < n_context per batch row (0 for uncounted cells)
    panel_slot: torch.Tensor  # [T] int64 per packed token: its index m among its cell's panel tokens, or -1
    panel_at: torch.Tensor  # [C, M] int64 panel positions as indices into the cell's packed tokens, -1 past its count
    packed_counted: torch.Tensor  # [T_c] int64 the packed indices of the counted cells' tokens (gene_src's order)


def batch_rows(plan: BatchPlan) -> BatchRows:
    """The plan's :class:`BatchRows`, derived at its first use and kept in the plan's cache."""
    return plan.derived("torch rows", lambda: _batch_rows(plan))


def _batch_rows(plan: BatchPlan) -> BatchRows:
    B, L, dev, counted = plan.B, plan.L, plan.device, plan.counted
    token_cell = plan.token_index // L
    query_pos = torch.argsort(plan.padding.to(torch.uint8), dim=1, stable=True)  # real positions first
    counted_slot = torch.full((B,), -1, dtype=torch.long, device=dev)
    counted_slot[counted] = torch.arange(plan.n_counted, device=dev)
    per_row = lambda x: torch.zeros(B, dtype=torch.long, device=dev).index_copy_(0, counted, x)  # noqa: E731
    panel_pos = plan.panel_pos
    rank = plan.real[counted].long().cumsum(1) - 1  # index of each real position among the cell's real tokens
    panel_at = torch.where(panel_pos >= 0, rank.gather(1, panel_pos.clamp(min=0)), -1)
    slot_map = torch.full((B, L), -1, dtype=torch.long, device=dev)
    if panel_pos.shape[1]:
        has = panel_pos >= 0
        m = torch.arange(panel_pos.shape[1], device=dev).expand_as(panel_pos)
        slot_map[counted[:, None].expand_as(panel_pos)[has], panel_pos[has]] = m[has]
    return BatchRows(
        cu_q=torch.arange(0, (B + 1) * L, L, device=dev),
        q_rows=(torch.arange(B, device=dev)[:, None] * L + query_pos).reshape(-1),
        k_rows=plan.token_index, token_cell=token_cell, counted_slot=counted_slot,
        n_window=per_row(plan.n_window), n_context=per_row(plan.n_context),
        panel_slot=slot_map.reshape(-1)[plan.token_index], panel_at=panel_at,
        packed_counted=(counted_slot[token_cell] >= 0).nonzero().flatten(),
    )  # fmt: skip


def blocked_stats(inp: Inputs, spec: StatsSpec, sums=None, block_elems: int = BLOCK_ELEMS):
    """One-off call on checked inputs (one labeling): ``(out, sums)`` shaped as ``sum_shapes``."""
    B, H, L, D = inp.q.shape
    plan = build_plan(spec, inp.groups[None], inp.padding, inp.tokens, shape=(B, L), device=inp.q.device)
    sums = empty_sums(spec, H, device=inp.q.device) if sums is None else sums
    out, cells = blocked_cells(inp.q, inp.k, inp.v, plan, inp.scale, block_elems)
    reduce_into(plan, cells, Target({k: v[None] for k, v in sums.items()}, slice(0, 1)))
    return out, sums


def blocked_cells(q, k, v, plan: BatchPlan, scale: float, block_elems: int = BLOCK_ELEMS):
    """The torch backend on a plan: ``(out, CellResults)``; refuses non-finite q, k, v (found in the
    row log-sum-exp and the output, with no extra pass)."""
    B, H, L, D = q.shape
    spec = plan.spec
    if q.device.type == "cpu" and H * plan.max_len**2 >= FUSED_MIN_SCORES and fused_rows.available():
        return _fused_batch(q, k, v, plan, scale)
    out = torch.empty_like(q)
    C, W = plan.n_counted, plan.window
    f32 = dict(dtype=torch.float32, device=q.device)
    received = torch.zeros(C, H, L, **f32) if spec.gene_stats else None
    summary = torch.zeros(C, H, 4, **f32)
    window = torch.zeros(C, H, W, W, **f32)
    M = plan.panel_pos.shape[1]
    pair_block = torch.zeros(C, H, M, M, **f32) if spec.panel else None
    NB = spec.map_bins
    map_rows = torch.zeros(C, H, NB, NB, dtype=torch.float64, device=q.device) if NB else None
    counted = dict(zip(plan.counted_host, range(C)))  # batch row -> counted cell
    host = plan.host
    finite = torch.ones((), dtype=torch.bool, device=q.device)
    cu = plan.cache_cu()
    for b in range(B):
        n = host["lengths"][b]
        idx = plan.positions[cu[b] : cu[b + 1]]  # the cell's real positions, ascending
        qb, kb, vb = (x[b].float() for x in (q, k, v))
        if n < L:
            kb, vb = kb[:, idx], vb[:, idx]
            pad = plan.padding[b].nonzero().flatten()  # padded query rows: output only, over the real keys
            out[b, :, pad] = F.scaled_dot_product_attention(qb[:, pad], kb, vb, scale=scale).to(out.dtype)
            qb = qb[:, idx]
        c = counted.get(b)
        if c is None:  # not counted in any labeling: output only
            o = F.scaled_dot_product_attention(qb, kb, vb, scale=scale)
            finite &= torch.isfinite(o.sum())  # no log-sum-exp here: the output shows any NaN or Inf
        else:
            at = batch_rows(plan).panel_at[c, : host["panel_count"][c]] if spec.panel else None
            bins = key_onehot(plan, b) if NB else None
            o, cell = _cell_stats(qb, kb, vb, host["n_window"][c], host["n_context"][c], at, scale, block_elems, bins)
            finite &= cell["finite"]
            if received is not None:
                received[c][:, idx] = cell["colsum"] / n
            summary[c] = cell["summary"]
            nw = host["n_window"][c]
            if host["window_prefix"][c]:
                window[c, :, :nw, :nw] = cell["window"]
            else:
                iw = idx[:nw]
                window[c][:, iw[:, None], iw[None, :]] = cell["window"]
            if pair_block is not None:
                m = at.numel()
                pair_block[c, :, :m, :m] = cell["pair"]
            if map_rows is not None:  # the rows of each query bin added up (queries bin like the keys)
                map_rows[c] = torch.einsum("ia,hic->hac", bins.double(), cell["per_bin"].double())
        if n < L:
            out[b, :, idx] = o.to(out.dtype)
        else:
            out[b] = o.to(out.dtype)
    if not bool(finite):
        refuse_non_finite(q, k, v)
    cells = CellResults(summary=summary, window=window)
    if received is not None:
        cells.received = received_pairs(plan, received)
    if pair_block is not None:
        cells.pair = pair_means(plan, pair_block)
    if map_rows is not None:
        cells.map = cell_maps(plan, map_rows)
    return out, cells


def _fused_batch(q, k, v, plan: BatchPlan, scale: float):
    """The whole batch in one compiled call (:func:`fused_rows.batch_rows`): the per-cell loop, the
    padded rows' output, the summaries, window and panel entries all inside it."""
    B, H, L, D = q.shape
    C, W = plan.n_counted, plan.window
    rows = batch_rows(plan)

    def flat(x):  # [B, H, L, D] -> [B * L, H, D] fp32 over the same memory (a view of the projections)
        return x.float().transpose(1, 2).reshape(B * L, H, D)

    # the kernel gathers each head's rows itself (q scaled as it goes): no packed copies of q, k, v
    outp, lse, row_stats, colsum, window, pair_block, check, map_rows = fused_rows.batch_rows(
        flat(q), flat(k), flat(v), rows.cu_q, plan.cu_seqlens, rows.counted_slot, rows.n_context,
        rows.n_window, rows.panel_slot, rows.panel_at, C, W,
        map_edges=None if plan.maps is None else plan.maps.edges,
        q_rows=rows.q_rows, k_rows=rows.k_rows, scale=scale,
    )  # fmt: skip
    if not bool(torch.isfinite(lse.sum() + check.sum())):  # see _cell_stats: no extra pass
        refuse_non_finite(q, k, v)
    # [B, L, H, D] memory, as the model's next projection wants it; returned as the [B, H, L, D] view
    out = outp.view(B, L, H, D).to(q.dtype).transpose(1, 2)
    lengths = plan.lengths.to(torch.float32)
    per_cell = q.new_zeros(B, H, 4, dtype=torch.float32).index_add_(0, rows.token_cell, row_stats.transpose(0, 1))
    cells = CellResults(summary=(per_cell / lengths[:, None, None])[plan.counted], window=window)
    for c, prefix in enumerate(plan.host["window_prefix"]):  # padding inside the window: to positions
        if not prefix:
            nw, b = plan.host["n_window"][c], plan.counted_host[c]
            iw = plan.positions[plan.cache_cu()[b] :][:nw]
            moved = torch.zeros_like(window[c])
            moved[:, iw[:, None], iw[None, :]] = window[c, :, :nw, :nw]
            window[c] = moved
    if plan.spec.gene_stats:
        colmean = colsum / lengths[rows.token_cell]
        r = colmean.new_zeros(plan.pair_cell.numel(), H)
        cells.received = r.index_add_(0, plan.gene_pairs, colmean[:, rows.packed_counted].T)
    if plan.spec.panel:
        cells.pair = pair_means(plan, pair_block)
    if plan.maps is not None:
        cells.map = cell_maps(plan, map_rows)
    return out, cells


def _cell_stats(q, k, v, nw: int, nc: int, at, scale, block_elems, key_bins=None):
    """Output rows and row reductions of one cell; q, k, v are [H, n, D] over its real tokens.

    One pass over eager row blocks does the heavy part (output, log-sum-exp, entropy, row max,
    column sums). The statistics of a few entries (window, panel, context, diagonal) are then
    recomputed exactly as ``exp(q.k * scale - lse)`` on just those entries.

    Returns the output and: ``colsum [H, n]`` (sum over rows of P), ``summary [H, 4]`` (means over
    rows), ``window [H, nw, nw]`` (P among real positions < W), ``pair [H, m, m]`` (P among the
    compacted positions ``at`` of panel ids) and, given ``key_bins [n, NB]`` (the one-hot of the keys'
    map bins), ``per_bin [H, n, NB]`` (each row's mass per key bin).
    """
    q = q * scale
    out, lse, entropy, row_max, colsum, per_bin = _rows_eager(q, k, v, block_elems, key_bins)

    def probs(rows, cols):  # exact P on a few entries, from the row log-sum-exp
        return torch.bmm(q[:, rows], k[:, cols].transpose(1, 2)).sub_(lse[:, rows, None]).exp_()

    context = probs(slice(None), slice(nc)).sum(-1)
    self_mass = (q * k).sum(-1).sub_(lse).exp_()
    per_row = torch.stack([entropy, context, self_mass, row_max], dim=-1)  # [H, n, 4]
    # a non-finite q or k makes its rows' (or every row's) log-sum-exp NaN; a non-finite v makes the
    # output rows NaN (0 * inf = NaN in P @ V): checking these costs nothing like a pass over q, k, v
    finite = torch.isfinite(lse.sum() + out[:, 0].sum())
    cell = {"summary": per_row.mean(1), "colsum": colsum, "window": probs(slice(nw), slice(nw)), "finite": finite}
    if at is not None:
        cell["pair"] = probs(at, at)
    if per_bin is not None:
        cell["per_bin"] = per_bin
    return out, cell


def _rows_eager(q, k, v, block_elems, key_bins=None):
    """The row pass in eager row blocks: (out, lse, entropy, row_max, colsum, per_bin); q already scaled.
    per_bin ``[H, n, NB]``: each row's mass per key bin (``E @ key_bins`` while the block is in cache;
    fp32 products and sums), None without ``key_bins``."""
    H, n, _ = q.shape
    rows = max(1, block_elems // (H * n))
    kt = k.transpose(1, 2)
    out = torch.empty_like(q)
    lse, entropy, row_max = q.new_empty(3, H, n)
    colsum = q.new_zeros(H, 1, n)
    per_bin = None if key_bins is None else q.new_empty(H, n, key_bins.shape[1])
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        s = torch.bmm(q[:, r0:r1], kt)  # [H, r, n] scaled scores, computed once
        m = s.amax(-1, keepdim=True)
        s.sub_(m)  # s - rowmax <= 0
        e = s.exp()  # unnormalized: p = e / z, so no pass divides the block
        z = e.sum(-1, keepdim=True)
        inv_z = z.reciprocal()
        torch.bmm(e, v, out=out[:, r0:r1]).mul_(inv_z)
        log_z = z.log()[..., 0]
        lse[:, r0:r1] = m[..., 0] + log_z
        entropy[:, r0:r1] = log_z - s.mul_(e).sum(-1) * inv_z[..., 0]  # log z - sum_j p_j (s_j - max)
        row_max[:, r0:r1] = inv_z[..., 0]  # max_j p_j = exp(0) / z
        colsum.baddbmm_(inv_z.transpose(1, 2), e)
        if per_bin is not None:
            per_bin[:, r0:r1] = torch.matmul(e, key_bins).mul_(inv_z)
    return out, lse, entropy, row_max, colsum[:, 0], per_bin
