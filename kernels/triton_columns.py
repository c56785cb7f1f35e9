"""Kernel 2 of the triton backend: the passes that rebuild P from kernel 1's log-sum-exp.

Kernel 1 (:mod:`.triton_forward`) writes the output, each row's ``term =
bias - lse2`` and the row statistics (entropy, row max, self and context mass)
from its online softmax. What is left needs the row's *final* normaliser: a
column sum adds ``p_ij`` over rows i, and during a single pass ``p_ij`` is only
known up to the row's running maximum and partial sum. So kernel 2 recomputes
``log2 p = q.k * scale * log2(e) + term`` (one FMA per score, one more ``Q K^T``,
no ``P V``) and reduces the exact P. Each program owns everything it writes: no
atomics, a fixed summation order, relaunching (as autotuning does) is harmless.

- ``_columns_kernel``: a program owns a key tile of one (counted cell, head) and
  loops over the cell's query tiles up to its extent; it writes per key the mean
  over real rows of ``p_ij`` (-> gene received). Tiles past the extent are skipped.
- ``_entries_kernel``: ``P`` at a few entries per cell: the ``[W, W]`` position
  window, or the panel genes' positions (for the pairs).

Their launchers are in :mod:`.triton_stats`; the whole-context maps' pass is :mod:`.triton_maps`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import MASKED_C, head_dim_configs, load_rows, mma


@triton.jit
def _log2_probs(a, b, a_term, b_term, qk_scale, DOT_PREC: tl.constexpr):
    """``log2 P`` on the tile ``a @ b^T``; one of a, b holds queries (term: kernel 1's ``bias - lse2``),
    the other keys (term: their padding bias)."""
    s = mma(a, tl.trans(b), DOT_PREC)
    return s * qk_scale + a_term[:, None] + b_term[None, :]


# 2**f on [-1/2, 1/2], degree 5, relative error 2.0e-7 in fp32 Horner (as MUFU's ex2.approx, ~2 ulp):
# a least-squares fit of the relative error at Chebyshev nodes, reweighted towards its peaks (numpy, once).
EXP2_POLY = (1.0000001192092896, 0.6931470632553101, 0.24022111296653748,
             0.05550599843263626, 0.009675886482000351, 0.0013313331874087453)  # fmt: skip
C0, C1, C2, C3, C4, C5 = (tl.constexpr(c) for c in EXP2_POLY)
ROUND = tl.constexpr(12582912.0)  # 1.5 * 2**23: x + ROUND holds round(x) in its low mantissa bits


@triton.jit
def exp2_fma(x):
    """``2**x`` on the FMA and integer pipes instead of the exponential unit (MUFU, 16/clk/SM on an
    H100 against 128 FMAs): round x to n by the 1.5 * 2**23 trick (no conversion instruction, which
    would share MUFU's rate), 2**(x - n) by a polynomial, n added into the exponent bits.
    x <= -125 gives about 2**-125 (not 0): nothing a sum of probabilities can see."""
    x = tl.maximum(x, -125.0)
    y = x + ROUND
    f = x - (y - ROUND)  # in [-1/2, 1/2], exact
    p = ((((C5 * f + C4) * f + C3) * f + C2) * f + C1) * f + C0
    n = y.to(tl.int32, bitcast=True) << 23  # round(x) << 23: the exponent field's increment
    return (p.to(tl.int32, bitcast=True) + n).to(tl.float32, bitcast=True)


@triton.jit
def _column_part(k, q_base, term_base, start, extent, sql, sqd, qk_scale,
                 HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
                 ROWS: tl.constexpr, ON_FMA: tl.constexpr):  # fmt: skip
    """Sum over the query rows ``start .. start + ROWS`` of P on a key tile ``k``: ``[keys]``."""
    rows = start + tl.arange(0, ROWS)
    q = load_rows(q_base, rows, rows < extent, sql, sqd, HEAD_D, BLOCK_D)
    term = tl.load(term_base + rows, mask=rows < extent, other=MASKED_C)  # padded rows: p = 0
    t = mma(k, tl.trans(q), DOT_PREC) * qk_scale + term[None, :]
    if ON_FMA:
        return tl.sum(exp2_fma(t), 1)
    return tl.sum(tl.exp2(t), 1)


#: The column pass's configs per (head dim, fp32 operands): (BLOCK_M, BLOCK_N, BLOCK_M_FMA, warps, stages),
#: the pinned one first; BLOCK_M_FMA more query rows per step whose exponentials run on the FMA pipe, the
#: rest on MUFU (what balances them is measured, not assumed). None spills on sm_80 or sm_90.
COLUMNS_CONFIGS = {
    # fp16/bf16: 32 of 160 rows on the FMA pipe balances it against MUFU at D 32 (sass_counts)
    (32, False): [(128, 128, 32, 4, 3), (128, 128, 0, 4, 3), (128, 128, 0, 8, 3), (64, 128, 0, 8, 3), (64, 64, 0, 4, 3)],
    (64, False): [(128, 128, 32, 4, 3), (128, 128, 0, 4, 3), (128, 128, 0, 8, 3), (64, 128, 0, 8, 3), (64, 64, 0, 4, 3)],
    (128, False): [(128, 128, 32, 4, 3), (128, 128, 0, 4, 3), (128, 128, 0, 8, 3), (64, 128, 0, 8, 3), (64, 64, 0, 4, 3)],
    (32, True): [(128, 128, 0, 4, 3), (128, 128, 0, 8, 3), (64, 128, 0, 8, 3), (64, 64, 0, 4, 3)],
    (64, True): [(128, 128, 0, 4, 3), (128, 128, 0, 8, 3), (64, 128, 0, 8, 3), (64, 64, 0, 4, 3), (32, 64, 0, 4, 2),
                 (64, 32, 0, 4, 2), (32, 32, 0, 4, 2)],
    (128, True): [(128, 128, 0, 8, 3), (64, 128, 0, 8, 3), (64, 64, 0, 4, 3), (32, 64, 0, 4, 2), (64, 32, 0, 4, 2),
                  (32, 32, 0, 4, 2), (16, 64, 0, 4, 2), (16, 32, 0, 4, 2), (16, 16, 0, 2, 2)],
}  # fmt: skip
_COLUMNS_CONFIGS, _columns_prune = head_dim_configs(COLUMNS_CONFIGS, ("BLOCK_M", "BLOCK_N", "BLOCK_M_FMA"), (32, 32, 16),
                                                    kernel="column pass")
#: The entries kernel's: (BLOCK_M, BLOCK_N, warps, stages).
ENTRIES_CONFIGS = {
    (32, False): [(64, 64, 4, 2), (32, 32, 4, 2)],
    (64, False): [(64, 64, 4, 2), (32, 32, 4, 2)],
    (128, False): [(64, 64, 4, 2), (64, 32, 4, 2)],
    (32, True): [(64, 64, 4, 2), (64, 32, 4, 2)],
    (64, True): [(64, 64, 4, 2), (64, 32, 4, 2)],
    (128, True): [(64, 32, 4, 2), (64, 64, 4, 2), (32, 32, 8, 2), (16, 32, 4, 2), (16, 16, 4, 2), (16, 16, 2, 2)],
}
_ENTRIES_CONFIGS, _entries_prune = head_dim_configs(ENTRIES_CONFIGS, kernel="entries")


@triton.autotune(
    configs=_COLUMNS_CONFIGS,
    prune_configs_by={"early_config_prune": _columns_prune},
    key=["L_BUCKET", "BLOCK_D", "DOT_PREC"],
)
@triton.jit
def _columns_kernel(
    Q, K, BIAS, TERM, EXTENT, INV_N, CELLS, RECEIVED, TILES,
    sqb, sqh, sql, sqd,
    skb, skh, skl, skd,
    H, L, L_BUCKET, qk_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, COUNT_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M_FMA: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    n_n = tl.cdiv(L, BLOCK_N)
    ch = pid // n_n  # (counted cell, head)
    pid_n = pid % n_n
    h = ch % H
    b = tl.load(CELLS + ch // H)  # the cell's index in the batch
    extent = tl.load(EXTENT + b)
    q_base = Q + b * sqb + h * sqh
    term_base = TERM + (b * H + h) * L
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    key_ok = keys < extent
    k = load_rows(K + b * skb + h * skh, keys, key_ok, skl, skd, HEAD_D, BLOCK_D)
    # a key tile at or beyond the extent visits no query tile (and stores zeros)
    end = tl.where(pid_n * BLOCK_N < extent, extent, 0)

    # tiles are [keys, queries] (P transposed), so sums over queries run along the MMA rows,
    # within a thread quad, like the forward's row sums (no cross-warp reduction per tile).
    # No key bias in the loop: a padded key's column is discarded below, so one FMA per score.
    colsum = tl.zeros([BLOCK_N], tl.float32)
    visited = 0
    for start in range(0, end, BLOCK_M + BLOCK_M_FMA):
        colsum += _column_part(k, q_base, term_base, start, extent, sql, sqd, qk_scale,
                               HEAD_D, BLOCK_D, DOT_PREC, BLOCK_M, False)  # fmt: skip
        if BLOCK_M_FMA > 0:
            colsum += _column_part(k, q_base, term_base, start + BLOCK_M, extent, sql, sqd, qk_scale,
                                   HEAD_D, BLOCK_D, DOT_PREC, BLOCK_M_FMA, True)  # fmt: skip
        if COUNT_TILES:
            visited += 1

    key_bias = tl.load(BIAS + b * L + keys, mask=key_ok, other=MASKED_C)
    received = tl.where(key_bias == 0.0, colsum * tl.load(INV_N + b), 0.0)  # mean over real rows
    c = (ch // H).to(tl.int64)
    tl.store(RECEIVED + (c * L + keys) * H + h, received, mask=keys < L)  # [C, L, H]: by token, then head
    if COUNT_TILES:
        tl.store(TILES + pid, visited)


@triton.autotune(configs=_ENTRIES_CONFIGS, prune_configs_by={"early_config_prune": _entries_prune},
                 key=["W", "BLOCK_D", "DOT_PREC"])
@triton.jit
def _entries_kernel(
    Q, K, BIAS, TERM, EXTENT, CELLS, POS, OUT,
    sqb, sqh, sql, sqd,
    skb, skh, skl, skd,
    H, L, W, qk_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """``P[b, h, pos_i, pos_j]`` for every counted cell ``c -> b = CELLS[c]`` into ``OUT [C, H, W, W]``:
    positions ``i < W`` (WINDOW) or ``POS[c, i]`` (a panel; -1 = none). 0 at padded or absent positions."""
    pid = tl.program_id(0)
    n_i = tl.cdiv(W, BLOCK_M)
    n_j = tl.cdiv(W, BLOCK_N)
    ch = pid // (n_i * n_j)
    tile = pid % (n_i * n_j)
    c = ch // H
    h = ch % H
    b = tl.load(CELLS + c)
    extent = tl.load(EXTENT + b)
    i = (tile // n_j) * BLOCK_M + tl.arange(0, BLOCK_M)
    j = (tile % n_j) * BLOCK_N + tl.arange(0, BLOCK_N)
    if WINDOW:
        rows, cols = i, j
    else:
        rows = tl.load(POS + c * W + i, mask=i < W, other=-1)
        cols = tl.load(POS + c * W + j, mask=j < W, other=-1)
    # beyond the extent nothing is loaded (a tile past it is all zeros)
    row_ok = (i < W) & (rows >= 0) & (rows < extent)
    col_ok = (j < W) & (cols >= 0) & (cols < extent)
    q = load_rows(Q + b * sqb + h * sqh, rows, row_ok, sql, sqd, HEAD_D, BLOCK_D)
    k = load_rows(K + b * skb + h * skh, cols, col_ok, skl, skd, HEAD_D, BLOCK_D)
    term = tl.load(TERM + (b * H + h) * L + rows, mask=row_ok, other=MASKED_C)
    key_bias = tl.load(BIAS + b * L + cols, mask=col_ok, other=MASKED_C)
    p = tl.exp2(_log2_probs(q, k, term, key_bias, qk_scale, DOT_PREC))
    dst = ch.to(tl.int64) * W * W + i[:, None] * W + j[None, :]
    tl.store(OUT + dst, p, mask=(i[:, None] < W) & (j[None, :] < W))
