"""The fast CPU path (runs on CUDA too): exact softmax in row blocks.

Per cell, keys are compacted to the real tokens, so no mask is needed and
padded keys cost nothing. Real query rows go in blocks; a full row of keys
fits in cache, so each block of scores is computed once and shared by the
exact softmax, ``P @ V`` and the row and column reductions. On CPU that pass
is one compiled, fused kernel (:mod:`.fused_rows`, built on first use); the
eager row-block loop is the fallback and the CUDA path. Padded query rows
only need their output (they are never counted) and get one plain
``scaled_dot_product_attention`` call over the real keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import fused_rows
from .reduce import add_group_sums, add_pairs, add_received, add_window_counts, group_onehot, panel_positions
from .spec import Inputs, StatsSpec, empty_sums

#: The fused kernel pays off (and is built, once) only for cells with at least this many scores
#: (heads x tokens^2); smaller cells, e.g. of demo-sized models, stay on the eager loop.
FUSED_MIN_SCORES = 2**18

#: Scores per eager block (heads x rows x keys): 2**20 fp32 = 4 MiB (measured fastest here).
BLOCK_ELEMS = 2**20


def blocked_stats(inp: Inputs, spec: StatsSpec, sums=None, block_elems: int = BLOCK_ELEMS):
    B, H, L, D = inp.q.shape
    out = torch.empty_like(inp.q)
    sums = empty_sums(spec, H, device=inp.q.device) if sums is None else sums
    cells = (inp.groups >= 0).nonzero().flatten()  # counted cells, reduced in this order
    groups, real = inp.groups[cells], ~inp.padding[cells]
    received = inp.q.new_zeros(len(cells), H, L, dtype=torch.float32)  # per cell: mean over real rows of P
    summary = inp.q.new_zeros(len(cells), H, 4, dtype=torch.float32)
    if spec.panel:
        panel = torch.tensor(spec.panel, dtype=torch.long, device=inp.q.device)
        pos, member = panel_positions(inp.tokens[cells], real, panel)
        pair_block = inp.q.new_zeros(len(cells), H, pos.shape[1], pos.shape[1], dtype=torch.float32)
    c = 0  # index of the next counted cell
    for b in range(B):
        idx = (~inp.padding[b]).nonzero().flatten()
        q, k, v = (x[b].float() for x in (inp.q, inp.k, inp.v))
        k, v = k[:, idx], v[:, idx]
        if idx.numel() < L:  # padded query rows: output only, over the real keys
            pad = inp.padding[b].nonzero().flatten()
            out[b, :, pad] = F.scaled_dot_product_attention(q[:, pad], k, v, scale=inp.scale).to(out.dtype)
        if inp.groups[b] < 0:  # not counted: output only
            out[b, :, idx] = F.scaled_dot_product_attention(q[:, idx], k, v, scale=inp.scale).to(out.dtype)
            continue
        # panel positions as indices into the compacted (real) tokens
        at = torch.searchsorted(idx, pos[c][pos[c] >= 0]) if spec.panel else None
        o, cell = _cell_stats(q[:, idx], k, v, idx, at, spec, inp.scale, block_elems)
        out[b, :, idx] = o.to(out.dtype)
        received[c][:, idx] = cell["colsum"] / idx.numel()
        summary[c] = cell["summary"]
        if spec.panel:
            pair_block[c, :, : at.numel(), : at.numel()] = cell["pair"]
        _add_window(sums, int(inp.groups[b]), idx, cell["window"])
        c += 1
    onehot = group_onehot(groups, spec.n_groups)
    sums["cells"] += onehot.sum(0)
    add_group_sums(sums, "summary", onehot, summary)
    add_window_counts(sums, onehot, real, min(spec.window, L))
    if spec.gene_stats:
        add_received(sums, groups, inp.tokens[cells], real, received, spec.vocab_size)
    if spec.panel and pos.shape[1]:
        add_pairs(sums, onehot, member, pair_block)
    return out, sums


def _cell_stats(q, k, v, idx, at, spec: StatsSpec, scale, block_elems):
    """Output rows and row reductions of one cell; q, k, v are [H, n, D] over its real tokens.

    One pass over row blocks does the heavy part (output, log-sum-exp, entropy, row max, column
    sums): compiled and fused (:mod:`.fused_rows`) on CPU for cells large enough to pay for it,
    else in eager row blocks. The statistics of a few entries (window, panel, context, diagonal) are then
    recomputed exactly as ``exp(q.k * scale - lse)`` on just those entries.

    Returns the output and: ``colsum [H, n]`` (sum over rows of P), ``summary [H, 4]`` (means over
    rows), ``window [H, nw, nw]`` (P among real positions < W) and ``pair [H, m, m]`` (P among the
    compacted positions ``at`` of panel ids).
    """
    q = q * scale
    H, n, _ = q.shape
    if q.device.type == "cpu" and H * n * n >= FUSED_MIN_SCORES and fused_rows.available():
        out, lse, entropy, row_max, colsum = fused_rows.cell_rows(q, k, v)
    else:
        out, lse, entropy, row_max, colsum = _rows_eager(q, k, v, block_elems)

    def probs(rows, cols):  # exact P on a few entries, from the row log-sum-exp
        return torch.bmm(q[:, rows], k[:, cols].transpose(1, 2)).sub_(lse[:, rows, None]).exp_()

    nw = int((idx < spec.window).sum())  # positions < W are a prefix of the sorted real positions
    nc = int((idx < spec.n_context).sum())
    context = probs(slice(None), slice(nc)).sum(-1)
    self_mass = (q * k).sum(-1).sub_(lse).exp_()
    per_row = torch.stack([entropy, context, self_mass, row_max], dim=-1)  # [H, n, 4]
    cell = {"summary": per_row.mean(1), "colsum": colsum, "window": probs(slice(nw), slice(nw))}
    if at is not None:
        cell["pair"] = probs(at, at)
    return out, cell


def _rows_eager(q, k, v, block_elems):
    """The row pass in eager row blocks: (out, lse, entropy, row_max, colsum); q already scaled."""
    H, n, _ = q.shape
    rows = max(1, block_elems // (H * n))
    kt = k.transpose(1, 2)
    out = torch.empty_like(q)
    lse, entropy, row_max = q.new_empty(3, H, n)
    colsum = q.new_zeros(H, 1, n)
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
    return out, lse, entropy, row_max, colsum[:, 0]


def _add_window(sums, g, idx, win):
    """Add one cell's window (P among its real positions < W) into group g's position sums."""
    nw = win.shape[-1]
    win = win.double()
    if nw == 0 or int(idx[nw - 1]) == nw - 1:  # no padding inside the window: a plain slice
        sums["pos_sum"][g, :, :nw, :nw] += win
        sums["pos_sq"][g, :, :nw, :nw] += win**2
    else:
        iw = idx[:nw]
        sums["pos_sum"][g][:, iw[:, None], iw[None, :]] += win
        sums["pos_sq"][g][:, iw[:, None], iw[None, :]] += win**2
