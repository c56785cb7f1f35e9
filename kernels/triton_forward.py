"""Kernel 1 of the triton backend: flash-style attention forward that also keeps the log-sum-exp.

One program owns ``BLOCK_M`` query rows of one (cell, head) and streams the
keys in tiles of ``BLOCK_N`` with an online softmax (running max ``m``,
running sum ``l``). Besides ``O`` it writes the row's log-sum-exp, which
kernel 2 (:mod:`.triton_stats`) needs to rebuild ``P`` exactly, and on request
the row's largest probability ``1 / l`` (the ``row_max`` summary), which no
key tile of kernel 2 sees whole.

Conventions shared with kernel 2: scores are kept in base 2, ``t = q.k * scale
* log2(e)``, so that ``exp2`` does the exponentials; padded keys and rows get a
finite ``MASKED`` bias instead of ``-inf``, so a tile with no real key never
computes ``-inf - (-inf)`` and ``p * log p`` of a masked entry is ``0``, not NaN.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

#: Read once at import: the interpreter must be on before any kernel is decorated.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
MASKED = -1.0e30  # finite "-inf": exp2 of it (or of twice it) is exactly 0
# kernels may only read globals that are constexpr
MASKED_C = tl.constexpr(MASKED)
LN2_C = tl.constexpr(LN2)
MAX_HEAD_DIM = 128


def tile_configs(gpu: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """Autotune configs ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` on a GPU; one small tile under
    the interpreter, where every config would be benchmarked ~1000x slower and tests must stay fast."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=1, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in gpu]


@triton.jit
def load_rows(base, idx, ok, stride_l, stride_d, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows ``idx`` of one (cell, head)'s [L, D] matrix as a [len(idx), BLOCK_D] tile; zeros where
    ``ok`` is false and in the head-dim padding (zeros leave every dot product unchanged)."""
    d = tl.arange(0, BLOCK_D)
    ptrs = base + idx[:, None].to(tl.int64) * stride_l + d[None, :] * stride_d
    return tl.load(ptrs, mask=ok[:, None] & (d[None, :] < HEAD_D), other=0.0)


@triton.autotune(
    configs=tile_configs([(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4), (128, 32, 4, 4), (64, 32, 4, 3)]),
    # L_BUCKET = next power of two of L: tune once per size class, not for every batch's length;
    # the tensor dtypes join the key automatically
    key=["L_BUCKET", "BLOCK_D"],
)
@triton.jit
def _forward_kernel(
    Q, K, V, BIAS, OUT, LSE2, PMAX,
    sqb, sqh, sql, sqd,
    skb, skh, skl, skd,
    svb, svh, svl, svd,
    sob, soh, sol, sod,
    H, L, L_BUCKET, qk_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, WRITE_PMAX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q = load_rows(Q + b * sqb + h * sqh, rows, rows < L, sql, sqd, HEAD_D, BLOCK_D)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    m_i = tl.full([BLOCK_M], MASKED_C, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, L, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = load_rows(k_base, cols, cols < L, skl, skd, HEAD_D, BLOCK_D)
        v = load_rows(v_base, cols, cols < L, svl, svd, HEAD_D, BLOCK_D)
        bias = tl.load(BIAS + b * L + cols, mask=cols < L, other=MASKED_C)
        t = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale + bias[None, :]
        m_new = tl.maximum(m_i, tl.max(t, 1))
        # while only masked keys were seen, m = MASKED and they weigh 1 each; the first real key
        # raises m by ~1e30, alpha = 0 and they vanish (every row has at least one real key)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(t - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    out = acc / l_i[:, None]
    d = tl.arange(0, BLOCK_D)
    o_ptrs = OUT + b * sob + h * soh + rows[:, None].to(tl.int64) * sol + d[None, :] * sod
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=(rows[:, None] < L) & (d[None, :] < HEAD_D))
    row_ptrs = bh.to(tl.int64) * L + rows
    tl.store(LSE2 + row_ptrs, m_i + tl.log2(l_i), mask=rows < L)
    if WRITE_PMAX:
        tl.store(PMAX + row_ptrs, 1.0 / l_i, mask=rows < L)  # max_j p_ij = exp2(m - m) / l


# ----------------------------------------------------------------------------- launchers
def check_tensors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ValueError for inputs the triton kernels cannot take, naming the fix."""
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
    if B * H > 65535:
        raise ValueError(f"B * H = {B * H} exceeds the launch grid (65535); split the batch")


def key_bias(padding: torch.Tensor) -> torch.Tensor:
    """[B, L] float32: 0 for real tokens, MASKED for padding; added to keys' (and rows') scores."""
    return torch.zeros(padding.shape, dtype=torch.float32, device=padding.device).masked_fill_(padding, MASKED)


def forward(q, k, v, bias, scale: float, want_pmax: bool = False):
    """Kernel 1 on checked inputs: ``out`` (dtype of q), base-2 ``lse2`` [B, H, L] and, if asked,
    the rows' largest probabilities ``pmax`` [B, H, L] (float32)."""
    B, H, L, D = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse2 = torch.empty(B, H, L, dtype=torch.float32, device=q.device)
    pmax = torch.empty_like(lse2) if want_pmax else lse2  # never written when not asked for
    grid = lambda meta: (triton.cdiv(L, meta["BLOCK_M"]), B * H)  # noqa: E731
    _forward_kernel[grid](
        q, k, v, bias, out, lse2, pmax,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, L, triton.next_power_of_2(L), scale * LOG2E,
        HEAD_D=D, BLOCK_D=block_d(D), DOT_PREC=dot_precision(q.dtype), WRITE_PMAX=want_pmax,
    )  # fmt: skip
    return out, lse2, (pmax if want_pmax else None)


def block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))  # tl.dot needs >= 16 along the reduced axis


def dot_precision(dtype: torch.dtype) -> str | None:
    # fp32 inputs get true fp32 dots, not tf32: the statistics are meant to match the reference to ~1e-6
    return "ieee" if dtype == torch.float32 else None


def triton_forward(q, k, v, padding=None, scale=None):
    """Softmax attention over ``[B, H, L, D]`` with a key padding mask ``[B, L]`` (True = padding).

    Returns ``(out, lse)``: the output in the dtype of ``q`` (padded query rows
    attend to the real keys, as SDPA with a key mask) and the natural-log
    log-sum-exp of every row's scaled scores over the real keys, float32 [B, H, L].
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
    out, lse2, _ = forward(q, k, v, key_bias(padding), D**-0.5 if scale is None else float(scale))
    return out, lse2 * LN2
