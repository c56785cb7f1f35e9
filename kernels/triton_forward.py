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

import math
import os

import torch
import triton
import triton.language as tl

from .triton_options import dot_precision, resolve

#: Read once at import: the interpreter must be on before any kernel is decorated.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
MASKED = -1.0e30  # finite "-inf": exp2 of it (or of twice it) is exactly 0
# kernels may only read globals that are constexpr
MASKED_C = tl.constexpr(MASKED)
#: A padded key's raw score (before qk_scale): a power of two, so that s * qk_scale is exact and
#: ``s * qk_scale - m`` is exactly 0 when m is the scaled max of padded keys only (see the loop)
MASKED_RAW = tl.constexpr(-(2.0**100))
LN2_C = tl.constexpr(LN2)
MAX_HEAD_DIM = 128
#: Programs of a 1-D launch grid (axis 0 allows 2**31 - 1; axes 1 and 2 only 65,535, so none is used).
MAX_PROGRAMS = 2**31 - 1
#: Under the interpreter tl.dot ignores input_precision (numpy fp32 matmul) and gets bfloat16 wrong, so
#: :func:`mma` emulates each policy's operand rounding with bit operations there.
EMULATE = tl.constexpr(INTERPRET)
#: Context keys are re-scored after the loop in tiles of this many (tl.dot needs >= 16).
CTX_BLOCK = 16


def tile_configs(gpu: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """Autotune configs ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` on a GPU; one small tile under
    the interpreter, where every config would be benchmarked ~1000x slower and tests must stay fast."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=1, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in gpu]


def table_key(block_d: int, dot_prec: str) -> tuple[int, bool]:
    """Which row of a per-head-dim config table a launch reads: (BLOCK_D, at least 32; fp32 operands)."""
    return max(32, int(block_d)), dot_prec != "native"


def _config_id(config: triton.Config, names) -> tuple:
    return (*(config.kwargs.get(n, 0) for n in names), config.num_warps, config.num_stages)


def head_dim_configs(table: dict, names=("BLOCK_M", "BLOCK_N"), interpreter: tuple = (32, 32), kernel: str = ""):
    """``(configs, prune)`` for ``triton.autotune``: every config of ``table`` ({(BLOCK_D, fp32 operands):
    [(*sizes, warps, stages), ...]}, candidates in order of preference) and an ``early_config_prune``
    that keeps, before any tuning, the configs of the launch's row in the row's order that compiled
    without register spills for the launch's GPU and precision (:func:`spill_free`); its first is the
    deterministic mode's pinned config. A config list that has none of the row's (a test forcing tiles,
    the interpreter's one small tile) is kept as it is. Under the interpreter: one config of
    ``interpreter`` sizes."""
    if INTERPRET:
        configs = [triton.Config(dict(zip(names, interpreter)), num_warps=1, num_stages=1)]
    else:
        configs = table_configs(table, names)

    def prune(configs, named_args, **kwargs):
        key = table_key(kwargs["BLOCK_D"], kwargs["DOT_PREC"])
        wanted = spill_free(kernel, table.get(key, []), key[0], kwargs["DOT_PREC"], current_arch())
        by_id = {_config_id(c, names): c for c in configs}
        return [by_id[tuple(row)] for row in wanted if tuple(row) in by_id] or list(configs)

    return configs, prune


def current_arch() -> str | None:
    """The spill check's name of this process's GPU: ``sm_90a`` (Hopper), ``sm_80`` (Ampere and Ada: the
    same mma.sync code and register file), None elsewhere (no GPU, the interpreter)."""
    if INTERPRET or not torch.cuda.is_available():
        return None
    major = torch.cuda.get_device_capability()[0]
    return "sm_90a" if major >= 9 else "sm_80" if major == 8 else None


def spill_free(kernel: str, rows: list, head_dim: int, dot_prec: str, arch: str | None) -> list:
    """The rows of a table row that ptxas compiled without spills for ``arch`` and ``dot_prec``, in order
    (kernels/triton_spills.py, written by ``python benches/sass_counts.py --spills``). Rows never checked
    for that policy are dropped when any was checked (the non-default fp32 policies are checked until one
    is spill-free: they run that one); with no data (another GPU, the interpreter) all stay."""
    from .triton_spills import CHECKED

    if arch is None:
        return rows
    seen = {tuple(r): CHECKED.get((arch, kernel, head_dim, dot_prec, tuple(r))) for r in rows}
    if all(v is None for v in seen.values()):
        return rows
    free = [r for r in rows if seen[tuple(r)] == 0]
    if free:
        return free
    return [min((r for r in rows if seen[tuple(r)] is not None), key=lambda r: seen[tuple(r)])]  # the least spilling


def table_configs(table: dict, names=("BLOCK_M", "BLOCK_N")) -> list[triton.Config]:
    """Every config of a per-head-dim table, once each, in first-seen order."""
    rows = dict.fromkeys(tuple(row) for entries in table.values() for row in entries)
    return [triton.Config(dict(zip(names, row[:-2])), num_warps=row[-2], num_stages=row[-1]) for row in rows]


_PINNED: dict = {}


def pinned_config(kernel, args: tuple, kwargs: dict) -> triton.Config:
    """The deterministic mode's config of a launch: the first the kernel's prune keeps (no timing);
    remembered per kernel, config list, table row and precision (the prune reads nothing else)."""
    key = (id(kernel), kwargs.get("BLOCK_D"), kwargs.get("DOT_PREC"))
    hit = _PINNED.get(key)
    if hit is None or hit[0] is not kernel.configs:  # the list itself, not its id: a test may swap it
        configs = kernel.configs
        if kernel.early_config_prune is not None:
            configs = kernel.early_config_prune(configs, dict(zip(kernel.arg_names, args)), **kwargs)
        hit = _PINNED[key] = (kernel.configs, configs[0])
    return hit[1]


def launch(kernel, grid, args: tuple, kwargs: dict, deterministic: bool) -> None:
    """``kernel[grid](*args, **kwargs)``; in deterministic mode with its pinned config, never autotuned
    (no timing-dependent choice, no tuning sync): every run, shard and rank sums in the same order."""
    if not deterministic:
        kernel[grid](*args, **kwargs)
        return
    config = pinned_config(kernel, args, kwargs)
    kernel.best_config = config  # as the autotuner records its choice (tests read it)
    kernel.fn[grid](*args, **kwargs, **config.all_kwargs())


#: Kernel 1's configs per (head dim, fp32 operands): (BLOCK_M, BLOCK_N, warps, stages), the pinned one
#: first; none spills on sm_80 or sm_90 (python benches/sass_counts.py --spills).
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


@triton.jit
def load_rows(base, idx, ok, stride_l, stride_d, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows ``idx`` of one (cell, head)'s [L, D] matrix as a [len(idx), BLOCK_D] tile; zeros where
    ``ok`` is false and in the head-dim padding (zeros leave every dot product unchanged)."""
    d = tl.arange(0, BLOCK_D)
    ptrs = base + idx[:, None].to(tl.int64) * stride_l + d[None, :] * stride_d
    return tl.load(ptrs, mask=ok[:, None] & (d[None, :] < HEAD_D), other=0.0)


@triton.jit
def _tf32_rna(x):
    """fp32 -> tf32 (10 mantissa bits), round to nearest, ties away (as ``cvt.rna.tf32.f32``)."""
    return ((x.to(tl.int32, bitcast=True) + 0x1000) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def _tf32_trunc(x):
    """fp32 -> tf32 by dropping the low 13 bits (what a tensor core does with an fp32 register)."""
    return (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def _bf16_rne(x):
    """fp32 -> bf16 (7 mantissa bits), round to nearest even, kept in fp32 (as ``cvt.rn.bf16.f32``)."""
    bits = x.to(tl.int32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)


@triton.jit
def round_like_mma(x, PREC: tl.constexpr):
    """``x`` (fp32) rounded as :func:`mma` rounds its operands under a single-product policy (``tf32``,
    ``bf16``, ``fp16``); unchanged otherwise. For scores computed off the tensor cores (the diagonal)
    that must agree with the ones the log-sum-exp came from."""
    if PREC == "tf32":
        return _tf32_trunc(x)
    elif PREC == "bf16":
        return _bf16_rne(x)
    elif PREC == "fp16":
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def mma(a, b, PREC: tl.constexpr):
    """``a @ b`` with fp32 accumulation under the precision policy ``PREC`` (see triton_options):
    ``"native"`` for 16-bit inputs; for fp32 inputs ``"tf32x3"``, ``"tf32"``, ``"bf16"``, ``"fp16"``
    (tensor cores) or ``"ieee"`` (FMA pipe). Under the interpreter the roundings are emulated."""
    if PREC == "native":
        return tl.dot(a, b)
    elif PREC == "fp16":
        return tl.dot(a.to(tl.float16), b.to(tl.float16))
    elif PREC == "bf16":
        if EMULATE:
            return tl.dot(_bf16_rne(a), _bf16_rne(b), input_precision="ieee")
        else:
            return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    elif PREC == "tf32":
        if EMULATE:  # the hardware's truncation: the larger of the two possible errors
            return tl.dot(_tf32_trunc(a), _tf32_trunc(b), input_precision="ieee")
        else:
            return tl.dot(a, b, input_precision="tf32")
    elif PREC == "fp16x3":  # hi = fp16(x), lo = fp16(x - hi): 22 bits of x in three full-rate fp16 products
        a_hi = a.to(tl.float16)
        b_hi = b.to(tl.float16)
        a_lo = (a - a_hi.to(tl.float32)).to(tl.float16)
        b_lo = (b - b_hi.to(tl.float32)).to(tl.float16)
        small = tl.dot(a_lo, b_hi, tl.dot(a_hi, b_lo))
        return tl.dot(a_hi, b_hi, small)
    elif PREC == "tf32x3":
        if EMULATE:  # Triton's split: hi = rna(x), lo = x - hi (truncated by the tensor core)
            a_hi = _tf32_rna(a)
            b_hi = _tf32_rna(b)
            a_lo = _tf32_trunc(a - a_hi)
            b_lo = _tf32_trunc(b - b_hi)
            small = tl.dot(a_lo, b_hi, input_precision="ieee") + tl.dot(a_hi, b_lo, input_precision="ieee")
            return small + tl.dot(a_hi, b_hi, input_precision="ieee")
        else:
            return tl.dot(a, b, input_precision="tf32x3")
    else:
        return tl.dot(a, b, input_precision="ieee")


@triton.jit
def mma_pv(p, v, PREC: tl.constexpr):
    """``p @ v`` for unnormalized probabilities ``p`` (fp32): as :func:`mma`. Under ``fp16x3`` kernel 1's
    ``p`` comes scaled by 2**P_SHIFT (from the exponent's shift: no instruction), so that the low half
    of its fp16 split stays a normal fp16 down to p ~ 2**-24 and p stays below fp16's 65504."""
    if PREC == "fp16x3":
        return mma(p, v, PREC)
    else:
        return mma(p.to(v.dtype), v, PREC)


#: Under fp16x3 kernel 1 keeps p~ = 2**P_SHIFT exp2(t - m) <= 2**14 (see mma_pv); l and the output's
#: accumulator carry the same factor (it cancels in O = acc / l); lse, entropy and row max take it out.
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
