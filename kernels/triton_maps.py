"""Kernel 2's whole-context maps' pass: P rebuilt from kernel 1's row terms, binned on the fly.

For each counted cell and head, the sum over the real rows of each query bin a of the row's mass per key
bin c (:mod:`.maps`; the torch side divides by the rows of each bin). A program owns one block of
``BINS x BINS`` bins (a chunk of query bins, a chunk of key bins) of one (cell, head) and one split of that
chunk's query tiles; it visits only the key tiles of its key bins (bins are runs of positions) up to the
cell's extent, and only the query tiles of its query bins. Per query tile it keeps the rows' mass per key
bin ``[BLOCK_M, BINS]`` in registers (``P @ onehot``, the one-hot of the keys' bins built in registers),
then adds the rows of each query bin (``onehot^T @ rows``) into its ``[BINS, BINS]`` block. It stores that
block once, into its own slot of ``[C, H, S, NB, NB]``; the S splits are added in torch (float64, fixed
order): no atomics.

Precision: P is fp32 whatever the input dtype; the one-hot products run on tensor cores as two tf32
products, ``x = hi + lo`` (hi = x rounded to tf32, lo the exact rest, truncated to tf32 by the tensor core)
against the one-hot (0 and 1 are exact in tf32): about 2**-22 relative per entry, fp32 accumulation. A
16-bit cast of P would lose 2**-11 (fp16 also underflows below 6e-8), so there is none.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import EMULATE, INTERPRET, LOG2E, MASKED_C, MAX_PROGRAMS, _tf32_rna, _tf32_trunc, load_rows, mma
from .triton_forward import block_d
from .triton_options import dot_precision, resolve

#: Bins per program and axis (the register blocks are [BLOCK_M, BINS] and [BINS, BINS]); tl.dot needs >= 16.
MAX_BINS_BLOCK = 32
#: (BLOCK_M, BLOCK_N, warps) per (BLOCK_D > 64, fp32 operands), at 32 bins a block: none spills on sm_90 but
#: fp32 at head dim 128 (about 200 bytes: its tf32x3 q tile is wide), from ptxas -v without a GPU (as
#: benches/sass_counts.py compiles); not timed on a GPU yet.
TILES = {(False, False): (64, 32, 8), (True, False): (64, 32, 8), (False, True): (16, 32, 4), (True, True): (16, 32, 4)}
#: Aim for at least this many programs per launch (splitting a chunk's query tiles), at most MAX_SPLITS splits.
TARGET_PROGRAMS = 1024
MAX_SPLITS = 16


@triton.jit
def _split_dot(a, b, acc, ONEHOT_LEFT: tl.constexpr):
    """``acc + a @ b`` where one operand is a 0/1 one-hot (exact in tf32) and the other fp32 values: those
    split into a tf32 ``hi`` and the rest ``lo`` (about 22 bits in two tensor-core products)."""
    if ONEHOT_LEFT:
        acc = _tf32_pair(a, _tf32_rna(b), b - _tf32_rna(b), acc, True)
    else:
        acc = _tf32_pair(b, _tf32_rna(a), a - _tf32_rna(a), acc, False)
    return acc


@triton.jit
def _tf32_pair(onehot, hi, lo, acc, ONEHOT_LEFT: tl.constexpr):
    """``acc + onehot @ (hi + lo)`` (or ``(hi + lo) @ onehot``) as two tf32 products; ``lo`` is exact in fp32
    and truncated to tf32 by the tensor core (emulated under the interpreter, whose dot is an fp32 matmul)."""
    if EMULATE:
        lo = _tf32_trunc(lo)
        if ONEHOT_LEFT:
            acc = acc + tl.dot(onehot, hi, input_precision="ieee") + tl.dot(onehot, lo, input_precision="ieee")
        else:
            acc = acc + tl.dot(hi, onehot, input_precision="ieee") + tl.dot(lo, onehot, input_precision="ieee")
    else:
        if ONEHOT_LEFT:
            acc = tl.dot(onehot, lo, tl.dot(onehot, hi, acc, input_precision="tf32"), input_precision="tf32")
        else:
            acc = tl.dot(lo, onehot, tl.dot(hi, onehot, acc, input_precision="tf32"), input_precision="tf32")
    return acc


@triton.jit
def _bin_start(bin, NB, map_length):
    """The first position of ``bin`` (the smallest i with i * NB // map_length >= bin)."""
    return (bin.to(tl.int64) * map_length + NB - 1) // NB


@triton.jit
def _maps_kernel(
    Q, K, TERM, POS_BIN, EXTENT, CELLS, OUT,
    sqb, sqh, sql, sqd,
    skb, skh, skl, skd,
    H, L, NB, map_length, n_chunks, splits, qk_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BINS: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    split = pid % splits
    rest = pid // splits
    key_chunk = rest % n_chunks
    rest = rest // n_chunks
    query_chunk = rest % n_chunks
    ch = rest // n_chunks  # (counted cell, head)
    h = ch % H
    b = tl.load(CELLS + ch // H).to(tl.int64)
    extent = tl.load(EXTENT + b).to(tl.int64)
    a_ids = query_chunk * BINS + tl.arange(0, BINS)
    c_ids = key_chunk * BINS + tl.arange(0, BINS)
    # the positions of this program's query and key bins, up to the extent
    q_lo = _bin_start(query_chunk * BINS, NB, map_length)
    q_hi = tl.minimum(_bin_start(query_chunk * BINS + BINS, NB, map_length), extent)
    k_lo = _bin_start(key_chunk * BINS, NB, map_length)
    k_hi = tl.minimum(_bin_start(key_chunk * BINS + BINS, NB, map_length), extent)
    t_lo = q_lo // BLOCK_M
    n_tiles = tl.maximum(tl.cdiv(q_hi, BLOCK_M) - t_lo, 0)
    per_split = tl.cdiv(n_tiles, splits)
    t_start = t_lo + split * per_split
    t_end = tl.minimum(t_lo + n_tiles, t_start + per_split)

    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + h * skh
    bins_base = POS_BIN + b * L
    acc = tl.zeros([BINS, BINS], tl.float32)
    for t in range(t_start, t_end):
        rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < q_hi
        q = load_rows(q_base, rows, row_ok, sql, sqd, HEAD_D, BLOCK_D)
        term = tl.load(TERM + (b * H + h) * L + rows, mask=row_ok, other=MASKED_C)  # padded rows: p = 0
        row_bin = tl.load(bins_base + rows, mask=row_ok, other=-1)
        per_bin = tl.zeros([BLOCK_M, BINS], tl.float32)  # each row's mass per key bin of the chunk
        for start in range(k_lo - k_lo % BLOCK_N, k_hi, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = (cols >= k_lo) & (cols < k_hi)
            k = load_rows(k_base, cols, col_ok, skl, skd, HEAD_D, BLOCK_D)
            key_bin = tl.load(bins_base + cols, mask=col_ok, other=-1)  # -1: padding, or outside the chunk
            bias = tl.where(key_bin >= 0, 0.0, MASKED_C)  # a padded key's score is anything: mask it to p = 0
            p = tl.exp2(mma(q, tl.trans(k), DOT_PREC) * qk_scale + term[:, None] + bias[None, :])
            onehot = (key_bin[:, None] == c_ids[None, :]).to(tl.float32)  # [BLOCK_N, BINS]
            per_bin = _split_dot(p, onehot, per_bin, False)
        onehot_rows = (row_bin[None, :] == a_ids[:, None]).to(tl.float32)  # [BINS, BLOCK_M]
        acc = _split_dot(onehot_rows, per_bin, acc, True)
    dst = OUT + ((ch.to(tl.int64) * splits + split) * NB + a_ids[:, None]) * NB + c_ids[None, :]
    tl.store(dst, acc, mask=(a_ids[:, None] < NB) & (c_ids[None, :] < NB))


def binned_rows(q, k, term, pos_bin, extent, cells, scale: float, *, map_bins: int, map_length: int,
                work: dict | None = None, precision: str | None = None) -> torch.Tensor:  # fmt: skip
    """``[C, H, NB, NB]`` float64 (NB = ``map_bins``): per counted cell ``cells`` (batch indices) and head,
    per query bin the sum over its real rows of each row's mass per key bin. ``term [B, H, L]``: kernel 1's
    ``bias - lse2``; ``pos_bin [B, L]`` int32: each position's bin, -1 at padding (``MapPlan.pos_bin``);
    ``extent [B]`` int32. No host sync; ``work``: buffers reused by every layer."""
    opts = resolve(precision, None)
    B, H, L, D = q.shape
    C, NB = cells.shape[0], map_bins
    bins = min(MAX_BINS_BLOCK, max(16, triton.next_power_of_2(NB)))
    block_m, block_n, warps = _tiles(block_d(D), q.dtype)
    n_chunks = triton.cdiv(NB, bins)
    base = C * H * n_chunks * n_chunks
    tiles = max(1, triton.cdiv(min(L, map_length), block_m * n_chunks))  # query tiles per chunk, about
    splits = max(1, min(MAX_SPLITS, tiles, triton.cdiv(TARGET_PROGRAMS, max(base, 1))))
    if base * splits > MAX_PROGRAMS:
        raise ValueError(f"counted cells x heads x map bin blocks = {base} exceeds one launch grid; split the batch")
    work = {} if work is None else work
    shape = (C, H, splits, NB, NB)
    if "map_rows" not in work or tuple(work["map_rows"].shape) != shape:
        work["map_rows"] = torch.empty(shape, dtype=torch.float32, device=q.device)
    out = work["map_rows"]
    if C:
        _maps_kernel[(base * splits,)](
            q, k, term, pos_bin, extent, cells, out, *q.stride(), *k.stride(),
            H, L, NB, map_length, n_chunks, splits, scale * LOG2E,
            HEAD_D=D, BLOCK_D=block_d(D), DOT_PREC=dot_precision(q.dtype, opts.precision),
            BLOCK_M=block_m, BLOCK_N=block_n, BINS=bins, num_warps=warps, num_stages=2,
        )  # fmt: skip
    return out.sum(2, dtype=torch.float64)


def _tiles(block_dim: int, dtype) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, warps): one small tile under the interpreter (tests), :data:`TILES` on a GPU."""
    if INTERPRET:
        return 16, 16, 1
    return TILES[(block_dim > 64, dtype == torch.float32)]
