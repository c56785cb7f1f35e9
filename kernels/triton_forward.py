"""Kernel 1 of the triton backend: flash-style attention forward that also keeps the log-sum-exp and
the row statistics.

One program owns ``BLOCK_M`` query rows of one (cell, head) and streams the
keys in tiles of ``BLOCK_N`` with an online softmax (running max ``m``,
running sum ``l``). Key tiles at or beyond the cell's *extent* (one past its
last real token) are never visited, so trailing padding costs nothing in the
key loop (varlen, as FlashAttention's ``cu_seqlens``); padded keys inside the
extent are masked by a bias. Query tiles beyond the extent still get their
output (padded rows attend to the real keys, as ``scaled_dot_product_attention``
with a key mask does), at the cost of their real keys only.

Besides ``O`` it writes each row's ``term = bias - lse2`` (kernel 2 adds it to a
score to get ``log2 p``) and, from the same online softmax with no second
exponential over the row, the four row statistics of the head summaries:

- entropy: ``a = sum_j p~_j (t_j - m)`` rescaled like ``l``; ``H = ln2 (log2 l - a / l)``;
- row max: ``1 / l`` (the largest entry has ``p~ = exp2(m - m) = 1``);
- self mass ``p_ii`` from the diagonal score, context mass from the first C scores
  (C + 1 exponentials per row after the loop, not L).

They are stored already weighted by ``real_i / n`` (0 for padded rows), so a
cell's summary is a plain sum over its rows.

Conventions shared with kernel 2: scores are kept in base 2, ``t = q.k * scale
* log2(e)``, so that ``exp2`` does the exponentials; padded keys and rows get a
finite ``MASKED`` bias instead of ``-inf``, so a tile with no real key never
computes ``-inf - (-inf)`` and ``p * (t - m)`` of a masked entry is ``0``, not NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import (  # noqa: F401 (LOG2E, MASKED, ...: also read from here by the other passes)
    CTX_BLOCK, INTERPRET, LN2, LN2_C, LOG2E, MASKED, MASKED_C, MASKED_RAW, MAX_HEAD_DIM, MAX_PROGRAMS,
    head_dim_configs, launch, load_rows, mma, mma_pv, round_like_mma,
)
from .triton_options import dot_precision, resolve

#: Read once at import: the interpreter must be on before any kernel is decorated.
FORWARD_CONFIGS = {
    # fp16/bf16: 128 x 128 tiles of 4 warps have the fewest instructions per score at D 32 (sass_counts)
    (32, False): [(128, 128, 4, 3), (128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)],
    # fp32 operands (tf32x3 splits each into two tf32 halves): 128 x 128 of 4 warps spills
    (32, True): [(128, 64, 8, 3), (64, 64, 8, 3), (64, 64, 4, 2), (64, 32, 4, 3), (32, 32, 4, 2)],
    (64, False): [(128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 8, 3), (64, 32, 4, 3), (64, 64, 4, 2)],
    (64, True): [(64, 64, 8, 3), (64, 64, 8, 2), (64, 32, 8, 3), (32, 32, 4, 2)],
    (128, False): [(128, 64, 8, 2), (64, 64, 8, 3), (64, 128, 8, 3), (128, 32, 8, 3), (64, 64, 8, 2), (64, 32, 4, 3)],
    (128, True): [(32, 64, 8, 1), (16, 64, 4, 1), (16, 32, 4, 2), (16, 32, 4, 1), (16, 32, 2, 2), (16, 16, 4, 2)],
}
_FORWARD_CONFIGS, _forward_prune = head_dim_configs(FORWARD_CONFIGS, kernel="kernel 1")

P_SHIFT = tl.constexpr(14.0)


@triton.jit
def key_tile(q, k_base, v_base, bias_base, start, extent, skl, skd, svl, svd,
             HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, KEYS: tl.constexpr):  # fmt: skip
    """Raw scores ``q . k`` of the keys ``start .. start + KEYS`` and their values. Padded keys (past
    the extent or holes inside it) score ``MASKED_RAW``, in the tiles that have any: a tile of only
    real keys spends no instruction per score on the mask."""
    cols = start + tl.arange(0, KEYS)
    ok = cols < extent
    k = load_rows(k_base, cols, ok, skl, skd, HEAD_D, BLOCK_D)
    v = load_rows(v_base, cols, ok, svl, svd, HEAD_D, BLOCK_D)
    s = mma(q, tl.trans(k), DOT_PREC)
    real = tl.load(bias_base + cols, mask=ok, other=MASKED_C) == 0.0
    if tl.min(real.to(tl.int32), 0) == 0:
        s = tl.where(real[None, :], s, MASKED_RAW)
    return s, v


@triton.autotune(
    # per head dim and operand width, pruned before tuning (FORWARD_CONFIGS)
    configs=_FORWARD_CONFIGS,
    prune_configs_by={"early_config_prune": _forward_prune},
    # L_BUCKET = next power of two of L: tune once per size class, not for every batch's length;
    # the tensor dtypes join the key automatically
    key=["L_BUCKET", "BLOCK_D", "WITH_STATS", "DOT_PREC"],
)
@triton.jit
def _forward_kernel(
    Q, K, V, BIAS, EXTENT, INV_N, OUT, TERM, LSE2, ROWSTATS, TILES,
    sqb, sqh, sql, sqd,
    skb, skh, skl, skd,
    svb, svh, svl, svd,
    sob, soh, sol, sod,
    H, L, L_BUCKET, n_context, qk_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
    WITH_STATS: tl.constexpr, WRITE_LSE: tl.constexpr, COUNT_TILES: tl.constexpr, CTX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    n_m = tl.cdiv(L, BLOCK_M)
    bh = pid // n_m  # the query tiles of one (cell, head) are neighbours: they share K, V in L2
    pid_m = pid % n_m
    b = (bh // H).to(tl.int64)
    h = bh % H
    extent = tl.load(EXTENT + b)  # keys >= extent are padding: never visited
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + h * skh
    q = load_rows(q_base, rows, rows < L, sql, sqd, HEAD_D, BLOCK_D)
    v_base = V + b * svb + h * svh

    m_i = tl.full([BLOCK_M], MASKED_C, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    a_i = tl.zeros([BLOCK_M], tl.float32)  # sum_j p~_j (t_j - m): the entropy's running term
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    visited = 0
    bias_base = BIAS + b * L
    for start_n in range(0, extent, BLOCK_N):
        s, v = key_tile(q, k_base, v_base, bias_base, start_n, extent, skl, skd, svl, svd,
                        HEAD_D, BLOCK_D, DOT_PREC, BLOCK_N)  # fmt: skip
        # the max of raw scores, scaled (qk_scale > 0: the same as the max of scaled scores), so that
        # one FMA per score gives t - m = s * qk_scale - m
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        # while only padded keys were seen, m is MASKED_RAW * qk_scale (exact: a power of two times
        # qk_scale; they weigh exp2(0) = 1 each) or the initial MASKED if that is larger (they weigh 0);
        # the first real key raises m by ~1e29, alpha = 0 and they vanish (every row has a real key)
        alpha = tl.exp2(m_i - m_new)
        if DOT_PREC == "fp16x3":  # p~ scaled by 2**P_SHIFT through the same FMA (see mma_pv)
            shifted = s * qk_scale - (m_new - P_SHIFT)[:, None]
            p = tl.exp2(shifted)
            p_sum = tl.sum(p, 1)
            if WITH_STATS:  # sum p~ (t - m_new) with t - m_new = shifted - P_SHIFT
                a_i = alpha * (a_i + l_i * (m_i - m_new)) + (tl.sum(p * shifted, 1) - P_SHIFT * p_sum)
            l_i = l_i * alpha + p_sum
        else:
            shifted = s * qk_scale - m_new[:, None]
            p = tl.exp2(shifted)
            if WITH_STATS:
                # sum p~ (t - m_new) = alpha (a + l (m_old - m_new)) + this tile; a padded key adds 0 * x = 0
                a_i = alpha * (a_i + l_i * (m_i - m_new)) + tl.sum(p * shifted, 1)
            l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + mma_pv(p, v, DOT_PREC)
        m_i = m_new
        if COUNT_TILES:
            visited += 1

    out = acc / l_i[:, None]
    d = tl.arange(0, BLOCK_D)
    o_ptrs = OUT + b * sob + h * soh + rows[:, None].to(tl.int64) * sol + d[None, :] * sod
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=(rows[:, None] < L) & (d[None, :] < HEAD_D))
    row_ok = rows < L
    row_bias = tl.load(BIAS + b * L + rows, mask=row_ok, other=MASKED_C)
    log2_l = tl.log2(l_i)
    if DOT_PREC == "fp16x3":
        log2_l = log2_l - P_SHIFT  # l carries 2**P_SHIFT
    lse2 = m_i + log2_l
    term = row_bias - lse2  # log2 p_ij = t_ij (key bias included) + term_i; <= -1e30 for padded rows
    row_ptrs = bh.to(tl.int64) * L + rows
    tl.store(TERM + row_ptrs, term, mask=row_ok)
    if WRITE_LSE:  # padded rows too (the term has lost it under the mask)
        tl.store(LSE2 + row_ptrs, lse2, mask=row_ok)
    if WITH_STATS:
        # weight of a row in its cell's mean: 1 / n for real rows, 0 for padding (incl. rows >= L)
        weight = tl.where(row_bias == 0.0, tl.load(INV_N + b), 0.0)
        entropy = LN2_C * (log2_l - a_i / l_i)  # a and l carry the same factor
        # + 0 * sum(out): a NaN or Inf in v (which only the output sees) reaches the statistics' checksum
        row_max = tl.exp2(m_i - lse2) if DOT_PREC == "fp16x3" else 1.0 / l_i  # 1 / l without the 2**P_SHIFT
        row_max += 0.0 * tl.sum(out, 1)
        # self mass from the diagonal score, summed in fp32 like the dot (a padded row's term masks it)
        # (its operands rounded as the tensor cores rounded them for the lse, under a rounding policy)
        k_diag = round_like_mma(load_rows(k_base, rows, row_ok, skl, skd, HEAD_D, BLOCK_D).to(tl.float32), DOT_PREC)
        self_mass = tl.exp2(tl.sum(round_like_mma(q.to(tl.float32), DOT_PREC) * k_diag, 1) * qk_scale + term)
        # context mass: the first C keys re-scored against the final lse (C + ... exps per row, not L)
        context = tl.zeros([BLOCK_M], tl.float32)
        for start_c in range(0, tl.minimum(n_context, extent), CTX):
            cols = start_c + tl.arange(0, CTX)
            ok = (cols < n_context) & (cols < extent)
            k = load_rows(k_base, cols, ok, skl, skd, HEAD_D, BLOCK_D)
            bias = tl.load(BIAS + b * L + cols, mask=ok, other=MASKED_C)
            t = mma(q, tl.trans(k), DOT_PREC) * qk_scale + bias[None, :]
            context += tl.sum(tl.exp2(t + term[:, None]), 1)
        stats_base = ROWSTATS + bh.to(tl.int64) * 4 * L + rows  # [B, H, 4, L] in the order of SUMMARIES
        tl.store(stats_base, entropy * weight, mask=row_ok)
        tl.store(stats_base + L, context * weight, mask=row_ok)
        tl.store(stats_base + 2 * L, self_mass * weight, mask=row_ok)
        tl.store(stats_base + 3 * L, row_max * weight, mask=row_ok)
    if COUNT_TILES:
        tl.store(TILES + pid, visited)


# ----------------------------------------------------------------------------- launchers
def check_tensors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ValueError for inputs the triton kernels cannot take, naming the fix (shapes and
    dtypes only: nothing here reads a tensor's values, so nothing waits for the device)."""
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must share one shape [B, H, L, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"q, k, v must share one dtype of float32, float16 or bfloat16; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if q.device.type != "cuda" and not INTERPRET:
        raise ValueError(
            f"the triton backend needs CUDA tensors, got {q.device} tensors; to run it on CPU set "
            "TRITON_INTERPRET=1 before importing attnprof (slow, for tests), or use backend='torch'"
        )
    if INTERPRET and q.dtype == torch.bfloat16:
        raise ValueError(
            "the Triton interpreter (TRITON_INTERPRET=1) computes bfloat16 wrongly; pass float16 or "
            "float32 inputs, run on a CUDA GPU, or use backend='torch'"
        )
    B, H, L, D = q.shape
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"the triton backend takes head dims 1..{MAX_HEAD_DIM}, got D={D}; use backend='torch'")
    check_grid(B * H * L, "B * H * L")


def check_grid(programs: int, what: str) -> None:
    """Every launch is a 1-D grid of at most this many programs (tiles of >= 16 rows: /16)."""
    if programs > MAX_PROGRAMS * 16:
        raise ValueError(f"{what} = {programs} exceeds what one launch grid covers (2**35); split the batch")


def key_bias(padding: torch.Tensor) -> torch.Tensor:
    """[B, L] float32: 0 for real tokens, MASKED for padding; added to keys' (and rows') scores."""
    return torch.zeros(padding.shape, dtype=torch.float32, device=padding.device).masked_fill_(padding, MASKED)


def extents(padding: torch.Tensor) -> torch.Tensor:
    """[B] int32: one past each cell's last real token (keys and rows from there on are padding)."""
    L = padding.shape[1]
    return ((~padding).int() * torch.arange(1, L + 1, device=padding.device, dtype=torch.int32)).amax(1).int()


def forward(
    q, k, v, bias, extent, scale: float, *, inv_n=None, n_context: int = 0, tiles=None, want_lse=False,
    term=None, rowstats=None, precision=None, deterministic=None,
):  # fmt: skip
    """Kernel 1 on checked inputs: ``out`` (dtype of q) and the rows' ``term = bias - lse2`` [B, H, L]
    (float32, base 2); with ``inv_n`` ([B] float32, 1 / real tokens per cell) also the weighted row
    statistics ``rowstats`` [B, H, 4, L] (a cell's summary is their sum over L), else None.

    ``bias`` [B, L] float32 (:func:`key_bias`), ``extent`` [B] int32 (:func:`extents`).
    ``tiles``: an int32 buffer, one entry per program (``B * H * cdiv(L, BLOCK_M)``), zeroed: each
    program stores the key tiles it visited (a debug count, compiled out otherwise).
    ``want_lse``: also return every row's ``lse2`` [B, H, L] (padded rows included).
    ``term``, ``rowstats``: buffers of those shapes to write into (reused across layers), else new.
    ``precision``, ``deterministic``: see :mod:`.triton_options` (None: the options in force).
    """
    opts = resolve(precision, deterministic)
    B, H, L, D = q.shape
    if not 2.0**-60 <= scale * LOG2E <= 2.0**20:  # padded keys score MASKED_RAW * scale: far below any real one
        raise ValueError(f"the triton backend takes attention scales in [2**-60, 2**20], got {scale}; use backend='torch'")
    with_stats = inv_n is not None
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if term is None or term.shape != (B, H, L):
        term = torch.empty(B, H, L, dtype=torch.float32, device=q.device)
    if not with_stats:
        rowstats = None
    elif rowstats is None or rowstats.shape != (B, H, 4, L):
        rowstats = torch.empty(B, H, 4, L, dtype=torch.float32, device=q.device)
    lse2 = torch.empty_like(term) if want_lse else None
    grid = lambda meta: (B * H * triton.cdiv(L, meta["BLOCK_M"]),)  # noqa: E731
    args = (
        q, k, v, bias, extent, inv_n if with_stats else bias, out, term, lse2 if want_lse else term,
        rowstats if with_stats else term, tiles if tiles is not None else extent,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, L, triton.next_power_of_2(L), n_context, scale * LOG2E,
    )  # fmt: skip
    meta = dict(HEAD_D=D, BLOCK_D=block_d(D), DOT_PREC=dot_precision(q.dtype, opts.precision),
                WITH_STATS=with_stats, WRITE_LSE=want_lse, COUNT_TILES=tiles is not None, CTX=CTX_BLOCK)  # fmt: skip
    launch(_forward_kernel, grid, args, meta, opts.deterministic)
    return (out, term, rowstats, lse2) if want_lse else (out, term, rowstats)


def block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))  # tl.dot needs >= 16 along the reduced axis


def triton_forward(q, k, v, padding=None, scale=None, *, precision=None, deterministic=None):
    """Softmax attention over ``[B, H, L, D]`` with a key padding mask ``[B, L]`` (True = padding).

    Returns ``(out, lse)``: the output in the dtype of ``q`` (padded query rows
    attend to the real keys, as SDPA with a key mask) and the natural-log
    log-sum-exp of every row's scaled scores over the real keys, float32 [B, H, L].
    A one-off entry point: it checks the padding on the host (the profiler's plan does that once per forward).
    """
    check_tensors(q, k, v)
    B, H, L, D = q.shape
    if padding is None:
        padding = torch.zeros(B, L, dtype=torch.bool, device=q.device)
    if padding.shape != (B, L) or padding.dtype != torch.bool or padding.device != q.device:
        raise ValueError(
            f"padding must be a bool [B, L] = [{B}, {L}] tensor on {q.device}; "
            f"got {padding.dtype} {tuple(padding.shape)} on {padding.device}"
        )
    if bool(padding.all(1).any()):
        raise ValueError("some cells have no real token (all keys are padding); drop zero-length cells first")
    scale = D**-0.5 if scale is None else float(scale)
    out, _, _, lse2 = forward(q, k, v, key_bias(padding), extents(padding), scale, want_lse=True, precision=precision,
                             deterministic=deterministic)  # fmt: skip
    return out, lse2 * LN2
