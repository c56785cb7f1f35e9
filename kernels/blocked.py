"""The fast CPU path (runs on CUDA too): exact softmax in row blocks.

Per cell, keys are compacted to the real tokens, so no mask is needed and
padded keys cost nothing. Real query rows go in blocks of ``rows`` rows; a
full row of keys fits in cache, so each block of scores is computed once and
shared by the exact softmax, ``P @ V`` and every reduction. Padded query rows
only need their output (they are never counted) and get one plain
``scaled_dot_product_attention`` call over the real keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .spec import Inputs, StatsSpec, empty_sums

#: Scores per block (heads x rows x keys): 2**18 fp32 = 1 MiB, about one core's L2.
BLOCK_ELEMS = 2**18


def blocked_stats(inp: Inputs, spec: StatsSpec, block_elems: int = BLOCK_ELEMS):
    B, H, L, D = inp.q.shape
    out = torch.empty_like(inp.q)
    sums = empty_sums(spec, H, device=inp.q.device)
    panel = torch.tensor(spec.panel, dtype=torch.long, device=inp.q.device)
    for b in range(B):
        real = ~inp.padding[b]
        idx = real.nonzero().flatten()
        q, k, v = (x[b].float() for x in (inp.q, inp.k, inp.v))
        k, v = k[:, idx], v[:, idx]
        if idx.numel() < L:  # padded query rows: output only, over the real keys
            pad = inp.padding[b].nonzero().flatten()
            out[b, :, pad] = F.scaled_dot_product_attention(q[:, pad], k, v, scale=inp.scale).to(out.dtype)
        g = int(inp.groups[b])
        if g < 0:  # not counted: output only
            out[b, :, idx] = F.scaled_dot_product_attention(q[:, idx], k, v, scale=inp.scale).to(out.dtype)
            continue
        toks = inp.tokens[b, idx] if spec.gene_stats else None
        o, cell = _cell_stats(q[:, idx], k, v, idx, toks, panel, spec, inp.scale, block_elems)
        out[b, :, idx] = o.to(out.dtype)
        _add_cell(sums, g, idx, toks, panel, spec, cell)
    return out, sums


def _cell_stats(q, k, v, idx, toks, panel, spec: StatsSpec, scale, block_elems):
    """Output rows and per-cell reductions for one cell; q, k, v are [H, n, D] over real tokens."""
    H, n, _ = q.shape
    rows = max(1, block_elems // (H * n))
    nw = int((idx < spec.window).sum())  # positions < W are a prefix of the sorted real positions
    nc = int((idx < spec.n_context).sum())
    out = torch.empty_like(q)
    kt = (k * scale).transpose(1, 2)
    colsum = q.new_zeros(H, 1, n)
    summary = q.new_zeros(H, 4)  # row sums of entropy, context, self, row max
    win = q.new_zeros(H, nw, nw)
    if panel.numel():
        member = toks[None, :] == panel[:, None]  # [K, n]
        at = member.any(0).nonzero().flatten()  # positions holding a panel token
        pair_block = q.new_zeros(H, at.numel(), at.numel())
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        s = torch.bmm(q[:, r0:r1], kt)  # [H, r, n] scaled scores
        s.sub_(s.amax(-1, keepdim=True))  # s - rowmax <= 0; kept for the entropy
        e = s.exp()  # unnormalized: p = e / z, so no pass divides the block
        z = e.sum(-1, keepdim=True)
        inv_z = z.reciprocal()
        torch.bmm(e, v, out=out[:, r0:r1]).mul_(inv_z)
        # entropy of a row = log z - sum_j p_j (s_j - rowmax)
        e_dot_s = s.mul_(e).sum(-1)  # s is not needed after this
        summary[:, 0] += z.log().sum((1, 2)) - (e_dot_s * inv_z[..., 0]).sum(-1)
        summary[:, 1] += (e[:, :, :nc].sum(-1, keepdim=True) * inv_z).sum((1, 2))
        summary[:, 2] += (torch.diagonal(e[:, :, r0:r1], dim1=1, dim2=2) * inv_z[..., 0]).sum(-1)
        summary[:, 3] += inv_z.sum((1, 2))  # max_j p_j = exp(0) / z
        colsum.baddbmm_(inv_z.transpose(1, 2), e)  # sum over rows of p
        if r0 < nw:
            w1 = min(r1, nw)
            win[:, r0:w1] = e[:, : w1 - r0, :nw] * inv_z[:, : w1 - r0]
        if panel.numel():
            here = (at >= r0) & (at < r1)
            sel = at[here] - r0
            pair_block[:, here] = e[:, sel][:, :, at] * inv_z[:, sel]
    cell = {"summary": summary / n, "received": colsum[:, 0] / n, "window": win}
    if panel.numel():
        m = member[:, at].to(q.dtype)  # [K, m] which panel id sits at each panel position
        rows_mean = m / m.sum(1, keepdim=True).clamp(min=1)
        cell["pair"] = rows_mean @ pair_block @ m.T  # [H, K, K]: mean over u's rows of mass on v
        present = member.any(1)
        cell["pair_present"] = present[:, None] & present[None, :]
    return out, cell


def _add_cell(sums, g, idx, toks, panel, spec, cell):
    """Add one counted cell's reductions into the group sums (float64)."""
    sums["cells"][g] += 1
    summary = cell["summary"].double()
    sums["summary_sum"][g] += summary
    sums["summary_sq"][g] += summary**2
    nw = cell["window"].shape[-1]
    win = cell["window"].double()
    if nw == 0 or int(idx[nw - 1]) == nw - 1:  # no padding inside the window: a plain slice
        sums["pos_sum"][g, :, :nw, :nw] += win
        sums["pos_sq"][g, :, :nw, :nw] += win**2
        sums["pos_count"][g, :nw, :nw] += 1
    else:
        iw = idx[:nw]
        sums["pos_sum"][g][:, iw[:, None], iw[None, :]] += win
        sums["pos_sq"][g][:, iw[:, None], iw[None, :]] += win**2
        sums["pos_count"][g][iw[:, None], iw[None, :]] += 1
    if toks is None:
        return
    ids, inverse = toks.unique(return_inverse=True)  # repeated ids sum within the cell
    r = cell["received"].new_zeros(cell["received"].shape[0], ids.numel())
    r.index_add_(1, inverse, cell["received"])
    r = r.double()
    sums["recv_sum"][g].index_add_(1, ids, r)
    sums["recv_sq"][g].index_add_(1, ids, r**2)
    sums["recv_count"][g].index_add_(0, ids, torch.ones_like(ids, dtype=r.dtype))
    if panel.numel():
        present = cell["pair_present"]
        pair = cell["pair"].double() * present
        sums["pair_sum"][g] += pair
        sums["pair_sq"][g] += pair**2
        sums["pair_count"][g] += present
