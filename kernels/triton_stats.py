"""The triton backend: kernel 1 (:mod:`.triton_forward`) then kernel 2, which rebuilds P and reduces it.

Every statistic is a sum of ``P = exp2(t - lse2)`` over some entries, and a
row's normaliser ``lse2`` is only known once the row has seen every key. A
single pass with a running maximum would add up entries normalised by a
partial sum, so the backend is two-pass: kernel 1 writes ``lse2``, kernel 2
recomputes the scores ``t`` tile by tile (one extra ``Q K^T``, no ``P V``) and
reduces the exact ``P``.

Kernel 2 is three kernels, each program owning everything it writes: no
atomics, a fixed summation order, and relaunching (as autotuning does) is
harmless.

- ``_columns_kernel``: a program owns a key tile of one (cell, head) and loops
  over all query tiles; it writes per key ``sum_i p_ij`` (-> gene received,
  context mass), ``sum_i p_ij ln p_ij`` (-> entropy) and ``p_jj`` (-> self mass).
- ``_window_kernel``: a program owns a tile of one group's and head's ``[W, W]``
  window and loops over the group's cells, writing ``pos_sum``/``pos_sq``.
- ``_gather_kernel``: ``P`` at the panel genes' positions of each cell, for the pairs.

The rest is small and done in torch here: per-cell means and the four head
summaries, group sums (a one-hot matmul, fixed order), the scatter of the
per-cell received means by token id, the pair means and every count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .reduce import add_group_sums, add_pairs, add_received, add_window_counts, group_onehot, panel_positions
from .spec import Inputs, StatsSpec, empty_sums
from .triton_forward import (
    LN2_C,
    LOG2E,
    MASKED_C,
    block_d,
    check_tensors,
    dot_precision,
    forward,
    key_bias,
    load_rows,
    tile_configs,
)


@triton.jit
def _query_term(lse2_base, bias_base, idx, ok):
    """``bias - lse2`` of query rows ``idx``: added to a row's scores it gives ``log2 p``, and
    ``-1e30`` or less (``p = 0``) for a padded or absent row."""
    lse2 = tl.load(lse2_base + idx, mask=ok, other=0.0)
    bias = tl.load(bias_base + idx, mask=ok, other=MASKED_C)
    return bias - lse2


@triton.jit
def _log2_probs(a, b, a_term, b_term, qk_scale, DOT_PREC: tl.constexpr):
    """``log2 P`` on the tile ``a @ b^T``; one of a, b holds queries (term: ``_query_term``), the other
    keys (term: their padding bias)."""
    s = tl.dot(a, tl.trans(b), input_precision=DOT_PREC)
    return s * qk_scale + a_term[:, None] + b_term[None, :]


@triton.autotune(
    configs=tile_configs([(64, 128, 8, 3), (64, 64, 4, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 128, 4, 4)]),
    key=["L_BUCKET", "BLOCK_D"],
)
@triton.jit
def _columns_kernel(
    Q, K, BIAS, LSE2, CELLS, COLSUM, PLOGP, DIAG,
    sqb, sqh, sql, sqd,
    skb, skh, skl, skd,
    H, L, L_BUCKET, qk_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    ch = tl.program_id(1)  # (counted cell, head)
    h = ch % H
    b = tl.load(CELLS + ch // H)  # the cell's index in the batch
    q_base = Q + b * sqb + h * sqh
    lse2_base = LSE2 + (b * H + h) * L
    bias_base = BIAS + b * L
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    key_ok = keys < L
    k = load_rows(K + b * skb + h * skh, keys, key_ok, skl, skd, HEAD_D, BLOCK_D)
    key_bias = tl.load(bias_base + keys, mask=key_ok, other=MASKED_C)

    # tiles are [keys, queries] (P transposed), so sums over queries run along the MMA rows,
    # within a thread quad, like the forward's row sums (no cross-warp reduction per tile)
    colsum = tl.zeros([BLOCK_N], tl.float32)
    plogp = tl.zeros([BLOCK_N], tl.float32)  # sum_i p log2 p; masked entries give 0 * (-1e30) = 0
    for start_m in range(0, L, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q = load_rows(q_base, rows, rows < L, sql, sqd, HEAD_D, BLOCK_D)
        t = _log2_probs(k, q, key_bias, _query_term(lse2_base, bias_base, rows, rows < L), qk_scale, DOT_PREC)
        p = tl.exp2(t)
        colsum += tl.sum(p, 1)
        plogp += tl.sum(p * t, 1)

    # self mass p_jj from row j's own query: a row-wise dot instead of a branch in the loop
    # (row j's term already masks a padded j)
    q_diag = load_rows(q_base, keys, key_ok, sql, sqd, HEAD_D, BLOCK_D).to(tl.float32)
    s_diag = tl.sum(q_diag * k.to(tl.float32), 1)
    t_diag = s_diag * qk_scale + _query_term(lse2_base, bias_base, keys, key_ok)

    dst = ch.to(tl.int64) * L + keys
    tl.store(COLSUM + dst, colsum, mask=key_ok)
    tl.store(PLOGP + dst, plogp * LN2_C, mask=key_ok)
    tl.store(DIAG + dst, tl.exp2(t_diag), mask=key_ok)


@triton.autotune(
    configs=tile_configs([(64, 64, 4, 2), (32, 32, 4, 2), (128, 64, 8, 2), (64, 128, 8, 2)]),
    key=["W", "BLOCK_D"],
)
@triton.jit
def _window_kernel(
    Q, K, BIAS, LSE2, ORDER, SEG, POS_SUM, POS_SQ,
    sqb, sqh, sql, sqd,
    skb, skh, skl, skd,
    ssg, ssh, ssi, ssj,
    H, L, W, qk_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    gh = tl.program_id(2)  # (group, head)
    g = gh // H
    h = gh % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < W
    col_ok = cols < W
    # fp32 over the cells of one batch (p <= 1, at most B terms); batches add up in the fp64 sums
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_sq = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for i in range(tl.load(SEG + g), tl.load(SEG + g + 1)):  # the counted cells of group g, in batch order
        b = tl.load(ORDER + i)
        q = load_rows(Q + b * sqb + h * sqh, rows, row_ok, sql, sqd, HEAD_D, BLOCK_D)
        k = load_rows(K + b * skb + h * skh, cols, col_ok, skl, skd, HEAD_D, BLOCK_D)
        query_term = _query_term(LSE2 + (b * H + h) * L, BIAS + b * L, rows, row_ok)
        key_bias = tl.load(BIAS + b * L + cols, mask=col_ok, other=MASKED_C)
        p = tl.exp2(_log2_probs(q, k, query_term, key_bias, qk_scale, DOT_PREC))
        acc += p
        acc_sq += p * p
    dst = g.to(tl.int64) * ssg + h * ssh + rows[:, None] * ssi + cols[None, :] * ssj
    ok = row_ok[:, None] & col_ok[None, :]
    tl.store(POS_SUM + dst, acc.to(tl.float64), mask=ok)
    tl.store(POS_SQ + dst, acc_sq.to(tl.float64), mask=ok)


@triton.autotune(configs=tile_configs([(32, 32, 4, 1)]), key=["BLOCK_D"])
@triton.jit
def _gather_kernel(
    Q, K, BIAS, LSE2, CELLS, POS, OUT,
    sqb, sqh, sql, sqd,
    skb, skh, skl, skd,
    H, L, M, qk_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    ch = tl.program_id(2)
    c = ch // H
    h = ch % H
    b = tl.load(CELLS + c)
    i = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    j = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.load(POS + c * M + i, mask=i < M, other=-1)  # -1: this cell has fewer panel positions
    cols = tl.load(POS + c * M + j, mask=j < M, other=-1)
    q = load_rows(Q + b * sqb + h * sqh, rows, rows >= 0, sql, sqd, HEAD_D, BLOCK_D)
    k = load_rows(K + b * skb + h * skh, cols, cols >= 0, skl, skd, HEAD_D, BLOCK_D)
    query_term = _query_term(LSE2 + (b * H + h) * L, BIAS + b * L, rows, rows >= 0)
    key_bias = tl.load(BIAS + b * L + cols, mask=cols >= 0, other=MASKED_C)
    p = tl.exp2(_log2_probs(q, k, query_term, key_bias, qk_scale, DOT_PREC))
    dst = ch.to(tl.int64) * M * M + i[:, None] * M + j[None, :]
    tl.store(OUT + dst, p, mask=(i[:, None] < M) & (j[None, :] < M))


# ----------------------------------------------------------------------------- launcher
def triton_stats(inp: Inputs, spec: StatsSpec):
    """The ``triton`` backend of :func:`attnprof.kernels.attention_stats` on checked inputs."""
    q, k = inp.q, inp.k
    check_tensors(q, k, inp.v)
    B, H, L, D = q.shape
    bias = key_bias(inp.padding)
    out, lse2, pmax = forward(q, k, inp.v, bias, inp.scale, want_pmax=True)
    sums = empty_sums(spec, H, device=q.device)
    cells = (inp.groups >= 0).nonzero().flatten()  # only counted cells are reduced
    if cells.numel() == 0:
        return out, sums
    groups = inp.groups[cells]
    real = ~inp.padding[cells]  # [C, L]
    onehot = group_onehot(groups, spec.n_groups)
    kern = StatsKernels(q, k, bias, lse2, inp.scale)

    sums["cells"] += onehot.sum(0)
    _window(sums, kern, cells, groups, real, onehot, min(spec.window, L))

    colsum, plogp, diag = kern.columns(cells)
    n = real.sum(1, dtype=torch.float64)[:, None]  # real query rows per cell
    received = colsum.double() / n[..., None]  # [C, H, L]: mean over real rows of P
    context = real & (torch.arange(L, device=q.device) < spec.n_context)
    summary = torch.stack(
        [
            -plogp.double().sum(-1) / n,
            (received * context[:, None]).sum(-1),
            diag.double().sum(-1) / n,
            (pmax[cells].double() * real[:, None]).sum(-1) / n,
        ],
        dim=-1,
    )  # [C, H, 4] in the order of SUMMARIES
    add_group_sums(sums, "summary", onehot, summary)
    if spec.gene_stats:
        add_received(sums, groups, inp.tokens[cells], real, received, spec.vocab_size)
    if spec.panel:
        panel = torch.tensor(spec.panel, dtype=torch.long, device=q.device)
        _add_pairs(sums, kern, cells, onehot, inp.tokens[cells], real, panel)
    return out, sums


class StatsKernels:
    """Launches the kernel-2 family on one batch's q, k, bias and lse2."""

    def __init__(self, q, k, bias, lse2, scale):
        H, L, D = q.shape[1:]
        self.q, self.k, self.bias, self.lse2 = q, k, bias, lse2
        self.H, self.L = H, L
        self.args = (*q.stride(), *k.stride())
        self.meta = dict(HEAD_D=D, BLOCK_D=block_d(D), DOT_PREC=dot_precision(q.dtype))
        self.qk_scale = scale * LOG2E

    def columns(self, cells):
        """Per counted cell, head and key: ``sum_i p_ij``, ``sum_i p_ij ln p_ij``, ``p_jj`` (float32)."""
        H, L = self.H, self.L
        colsum, plogp, diag = torch.empty(3, cells.numel(), H, L, dtype=torch.float32, device=self.q.device)
        grid = lambda meta: (triton.cdiv(L, meta["BLOCK_N"]), cells.numel() * H)  # noqa: E731
        _columns_kernel[grid](
            self.q, self.k, self.bias, self.lse2, cells, colsum, plogp, diag,
            *self.args, H, L, triton.next_power_of_2(L), self.qk_scale, **self.meta,
        )  # fmt: skip
        return colsum, plogp, diag

    def window(self, order, seg, pos_sum, pos_sq, W):
        """Store every group's window sums into ``pos_sum/pos_sq[:, :, :W, :W]`` (group g: cells
        ``order[seg[g]:seg[g + 1]]``)."""
        G, H = pos_sum.shape[:2]
        grid = lambda meta: (triton.cdiv(W, meta["BLOCK_M"]), triton.cdiv(W, meta["BLOCK_N"]), G * H)  # noqa: E731
        _window_kernel[grid](
            self.q, self.k, self.bias, self.lse2, order, seg, pos_sum, pos_sq,
            *self.args, *pos_sum.stride(), H, self.L, W, self.qk_scale, **self.meta,
        )  # fmt: skip

    def gather(self, cells, pos):
        """``P[b, h, pos[c, i], pos[c, j]]`` for counted cell ``c = cells -> b``; 0 where ``pos`` is -1."""
        C, M = pos.shape
        block = torch.empty(C, self.H, M, M, dtype=torch.float32, device=self.q.device)
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(M, meta["BLOCK_N"]), C * self.H)  # noqa: E731
        _gather_kernel[grid](
            self.q, self.k, self.bias, self.lse2, cells, pos.contiguous(), block,
            *self.args, self.H, self.L, M, self.qk_scale, **self.meta,
        )  # fmt: skip
        return block


def _window(sums, kern, cells, groups, real, onehot, W):
    order = torch.argsort(groups, stable=True)  # counted cells, group by group
    seg = F.pad(torch.bincount(groups, minlength=onehot.shape[1]).cumsum(0), (1, 0))  # group g: order[seg[g]:seg[g+1]]
    kern.window(cells[order], seg, sums["pos_sum"], sums["pos_sq"], W)  # the kernel stores, sums start at 0
    add_window_counts(sums, onehot, real, W)


def _add_pairs(sums, kern, cells, onehot, toks, real, panel):
    pos, member = panel_positions(toks, real, panel)
    if pos.shape[1]:
        add_pairs(sums, onehot, member, kern.gather(cells, pos))
