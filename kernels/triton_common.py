"""What the triton kernels share: interpreter switch and masking constants, tile configurations (autotune
tables, per-architecture spill-free choices, pinned configs in deterministic mode), the launcher, and the
in-kernel helpers (row loads, products rounded like the tensor cores under each precision policy)."""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl


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
