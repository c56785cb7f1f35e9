"""The oracle: materialize P for the batch, then compute every statistic plainly.

Slow and memory-hungry on purpose: every line mirrors the definition in
DESIGN.md, cell by cell, so that the fast backends can be tested against it.
"""

from __future__ import annotations

import torch

from .spec import Inputs, StatsSpec, empty_sums, refuse_non_finite


def attention_probs(inp: Inputs) -> torch.Tensor:
    """P[b, h, i, j] in float32, softmax over keys with padded keys masked out."""
    q, k = inp.q.float(), inp.k.float()
    scores = torch.einsum("bhid,bhjd->bhij", q, k) * inp.scale
    scores = scores.masked_fill(inp.padding[:, None, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1)


def refuse_non_finite_inputs(inp: Inputs) -> None:
    """Refuse NaN or Inf in q, k or v (the oracle checks them plainly, one pass each)."""
    if not all(bool(torch.isfinite(x).all()) for x in (inp.q, inp.k, inp.v)):
        refuse_non_finite(inp.q, inp.k, inp.v)


def stats_from_probs(P, padding, groups, tokens, spec: StatsSpec, sums=None) -> dict[str, torch.Tensor]:
    """Every sum of the contract from given probabilities ``P [B, H, L, L]``.

    Also the oracle for adapters: feed it the maps a model returns with
    ``need_weights=True`` / ``output_attentions=True``. ``padding`` is ``[B, L]``
    bool (True = padding); rows that are padding are not counted. ``sums``: add into these.
    """
    B, H, L, _ = P.shape
    sums = empty_sums(spec, H, device=P.device) if sums is None else sums
    P = P.double()
    W = min(spec.window, L)
    for b in range(B):
        g = int(groups[b])
        if g < 0:
            continue
        real = ~padding[b]
        idx = real.nonzero().flatten()
        Pb = P[b][:, idx][:, :, idx]  # [H, n, n] over real tokens only
        sums["cells"][g] += 1

        # position window: both positions real
        both = (real[:W, None] & real[None, :W]).double()
        win = P[b, :, :W, :W] * both
        sums["pos_sum"][g, :, :W, :W] += win
        sums["pos_sq"][g, :, :W, :W] += win**2
        sums["pos_count"][g, :W, :W] += both

        # head summaries: per real row, then mean over real rows
        logP = torch.where(Pb > 0, Pb.log(), torch.zeros_like(Pb))
        entropy = -(Pb * logP).sum(-1)
        context = Pb[:, :, idx < spec.n_context].sum(-1)
        self_mass = torch.diagonal(Pb, dim1=-2, dim2=-1)
        row_max = Pb.max(-1).values
        cell = torch.stack([x.mean(-1) for x in (entropy, context, self_mass, row_max)], dim=-1)
        sums["summary_sum"][g] += cell
        sums["summary_sq"][g] += cell**2

        if spec.map_bins:  # whole-context map: per query bin, the mean over its real rows of the mass per key bin
            bins = idx * spec.map_bins // spec.map_length  # of the real tokens (check_batch: all < map_length)
            onehot = (bins[:, None] == torch.arange(spec.map_bins, device=P.device)).double()  # [n, NB]
            in_bin = onehot.sum(0)  # real tokens per bin: the query rows |R_a|, and the keys
            per_row = Pb @ onehot  # [H, n, NB]: each real row's mass per key bin
            m = torch.einsum("ia,hic->hac", onehot, per_row) / in_bin.clamp(min=1)[:, None]
            counts = ((in_bin > 0)[:, None] & (in_bin > 0)[None, :]).double()
            sums["map_sum"][g] += m * counts
            sums["map_sq"][g] += (m * counts) ** 2
            sums["map_count"][g] += counts

        if not spec.gene_stats:
            continue
        toks = tokens[b, idx]
        received = Pb.mean(dim=1)  # [H, n]: mean over real query rows
        for t in toks.unique().tolist():
            r = received[:, toks == t].sum(-1)
            sums["recv_sum"][g, :, t] += r
            sums["recv_sq"][g, :, t] += r**2
            sums["recv_count"][g, t] += 1
        for a, u in enumerate(spec.panel):
            for c, w in enumerate(spec.panel):
                rows, cols = toks == u, toks == w
                if not (rows.any() and cols.any()):
                    continue
                # mean over the query occurrences of u of the mass on all occurrences of w
                p = Pb[:, rows][:, :, cols].sum(-1).mean(-1)
                sums["pair_sum"][g, :, a, c] += p
                sums["pair_sq"][g, :, a, c] += p**2
                sums["pair_count"][g, a, c] += 1
    return sums
