"""Fused CPU row pass of one cell: exact softmax, ``P @ V`` and the row/column reductions.

``cell_rows(q, k, v)`` computes, for ``q`` (already scaled), ``k``, ``v`` of shape ``[H, n, D]``
(fp32, contiguous, CPU), with ``s = q k^T`` and ``p = softmax(s)`` over the last axis::

    out      = p @ v                               [H, n, D]
    lse_i    = max_j s_ij + log z_i                [H, n]
    entropy_i = log z_i - sum_j p_ij (s_ij - max_i) [H, n]
    row_max_i = 1 / z_i  (= max_j p_ij)            [H, n]
    colsum_j = sum_i p_ij                          [H, n]

exactly like the eager row-block loop in :func:`attnprof.kernels.blocked._cell_stats`, but in one
compiled pass: each task (a head and a fixed range of row blocks) computes a block of scores with a
single-threaded matrix product (ATen's CPU ``mm`` on views, i.e. libtorch's BLAS), then per row (while it is in L1) the max, ``exp(s - max)`` in place with
``z`` and ``sum e (s - max)`` in the same loop, and the column sums; then ``E @ V`` scaled by
``1 / z``. Tasks run under ``at::parallel_for``; each task writes its own column-sum partial, and
the partials are added in a fixed order, so results do not depend on the thread count.

The same extension holds the CPU scatter of gene sums, :func:`scatter_rows_add` (``scatter_rows.cpp``).

The C++ lives in ``fused_rows.cpp`` and ``scatter_rows.cpp`` beside this file (package data). It is built on
first use with ``torch.utils.cpp_extension.load`` through :func:`attnprof.kernels.cpp_build.load_extension`: one folder
per environment and binary (source, torch, compiler, flags, Python), a build announced on stderr with
its reason, a lock that names its owner and is cleared when that owner is gone; later processes only
load it. :func:`available` says whether it could be built; on failure it warns once and callers fall
back to eager code. ``ATTNPROF_FUSED=0`` disables it; ``ATTNPROF_EXTENSIONS_DIR`` moves the cache.
"""

from __future__ import annotations

import os
import threading
import warnings
from importlib import resources

import torch

#: Scores per row block (rows x keys fp32): 2**18 = 1 MiB, about one core's L2; rows in [32, 128].
BLOCK_ELEMS = 2**18

SOURCES = ("fused_rows.cpp", "scatter_rows.cpp")  # package data beside this file

_lock = threading.Lock()
_module = None
_failed: str | None = None


def _enabled() -> bool:
    return os.environ.get("ATTNPROF_FUSED", "1").strip().lower() not in ("0", "false", "no", "off")


#: Per CPU capability, the flags that make the ATen vec headers pick that capability's code (as ATen
#: builds its own kernels): 16 fp32 lanes on AVX512 (about 15% off the kernel there), 8 on AVX2. Every
#: compiler that builds torch's C++17 headers (GCC >= 9, Clang >= 5) takes the AVX512 flags.
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "DEFAULT": [],
}  # fmt: skip


def _flags(cap: str | None = None) -> tuple[str, list[str]]:
    """``(capability, compiler flags)``: torch's CPU capability (``ATEN_CPU_CAPABILITY`` lowers it) or ``cap``."""
    if cap is None:
        cap = "DEFAULT"
        try:
            cap = torch.backends.cpu.get_cpu_capability()
        except Exception:  # pragma: no cover - very old torch
            pass
    cap = cap if cap in _ISA_FLAGS else "DEFAULT"
    # -fopenmp: at::parallel_for is a header template that is only parallel when compiled with
    # OpenMP (ATen's default backend); the process already has torch's libgomp loaded.
    return cap, ["-O3", "-fopenmp", *_ISA_FLAGS[cap]]


def _sources() -> dict[str, bytes]:
    """The C++ sources, read as package data (works from a checkout, an editable or a regular install)."""
    here = resources.files(__package__)
    return {name: here.joinpath(name).read_bytes() for name in SOURCES}


def _load():
    global _module, _failed
    with _lock:
        if _module is not None or _failed is not None:
            return _module
        try:
            from .cpp_build import load_extension

            cap, flags = _flags()
            _module = load_extension(f"attnprof_fused_rows_{cap.lower()}", _sources(), cflags=flags,
                                     ldflags=["-fopenmp"], what="the fused CPU kernel")  # fmt: skip
        except Exception as e:  # build tools missing, compiler error, load error...
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            errs = [ln for ln in lines if "error" in ln.lower()]
            _failed = f"{type(e).__name__}: {(errs or lines or [''])[0][:300]}"
            warnings.warn(
                f"attnprof: the fused CPU row kernel could not be built ({_failed}); "
                f"using the eager path (set ATTNPROF_FUSED=0 to silence this)",
                RuntimeWarning,
                stacklevel=3,
            )
        return _module


def available() -> bool:
    """True when the fused kernel is enabled (``ATTNPROF_FUSED`` is not 0) and built; builds it once."""
    return _enabled() and _load() is not None


def _chunks(H: int, n: int, rows: int) -> int:
    """Row-block ranges per head: a function of the shape only, so results do not depend on threads."""
    nblocks = -(-n // rows)
    return max(1, min(nblocks, -(-16 // max(H, 1))))


def block_rows(n: int) -> int:
    return max(32, min(128, BLOCK_ELEMS // max(n, 1)))


def cell_rows(q, k, v, rows: int | None = None, fast_exp: bool = True):
    """``(out, lse, entropy, row_max, colsum)`` of one cell; q is already scaled; see the module doc.

    q, k, v: fp32 CPU ``[H, n, D]``. ``fast_exp`` uses ATen's ``exp_u20`` (the exp of SDPA's flash
    kernel: relative error < 4e-7 down to exp(-86), flushes to 0 below ~exp(-87.3)); False uses the
    1-ulp Sleef exp (about 20% slower). Call only when :func:`available` is True.
    """
    mod = _load()
    if mod is None:
        raise RuntimeError(f"the fused CPU row kernel is not available: {_failed}")
    H, n, _ = q.shape
    rows = block_rows(n) if rows is None else int(rows)
    out, lse, ent, rmax, colsum = mod.cell_rows(
        q.contiguous(), k.contiguous(), v.contiguous(), rows, _chunks(H, n, rows), fast_exp
    )
    return out, lse, ent, rmax, colsum


def batch_rows(q, k, v, cu_q, cu_k, slot, n_context, n_window, panel_slot, panel_at, n_counted: int, W: int,
               fast_exp: bool = True, map_edges=None, q_rows=None, k_rows=None, scale: float = 1.0):
    """Every cell of a batch in one call (the per-cell loop runs in the compiled kernel).

    q: ``[Tq, H, D]`` fp32, cells packed by ``cu_q [B + 1]``: each cell's n real rows first (in the
    order of its keys), then output-only rows; scaled by ``scale`` in the kernel (``q * scale`` in fp32).
    k, v: ``[Tk, H, D]`` the real tokens, packed by ``cu_k``. Given ``q_rows [Tq]`` (``k_rows [Tk]``),
    q (k and v) is instead ``[R, H, D]`` with any row and head strides (e.g. views of a fused projection)
    and packed row i is its row ``q_rows[i]``: the kernel gathers each head's rows itself, and ``out`` is
    ``[R, H, D]`` in q's rows (every row of q must be some packed row's). Per cell: ``slot`` (its
    counted-cell index, -1 if not counted), ``n_context`` and ``n_window`` (leading real tokens in the
    context and the window). Per real token:
    ``panel_slot`` (its index among the cell's panel tokens, or -1); ``panel_at [C, M]`` the panel
    tokens' indices among the cell's real tokens (-1 past the count).

    Returns ``out [Tq, H, D]`` (``[R, H, D]`` given ``q_rows``), ``lse [H, Tq]``, ``row_stats [H, Tk, 4]`` (entropy, context mass, self
    mass, row max per real row), ``colsum [H, Tk]``, ``window [C, H, W, W]`` (P among each counted
    cell's first ``n_window`` real tokens), ``pair [C, H, M, M]`` (P among its panel tokens),
    ``check [B * H]`` (the sum of each task's outputs: NaN or Inf where an output is not finite) and
    ``maps [C, H, NB, NB]`` float64: given ``map_edges [B, NB + 1]`` (where each whole-context map bin starts
    among the cell's real tokens, :class:`attnprof.kernels.maps.MapPlan`), per query bin the sum over its
    real rows of each row's mass per key bin (``[C, H, 0, 0]`` without).
    """
    mod = _load()
    if mod is None:
        raise RuntimeError(f"the fused CPU row kernel is not available: {_failed}")
    edges = cu_k.new_zeros(0, dtype=torch.long) if map_edges is None else map_edges
    return mod.batch_rows(q, k, v, cu_q, cu_k, slot, n_context, n_window, panel_slot, panel_at,
                          int(n_counted), int(W), fast_exp, edges, q_rows, k_rows, float(scale))  # fmt: skip


def scatter_rows_add(t, rows, slots, value) -> None:
    """``t[rows[p], m, slots[j]] += value[p, m, j]`` for float64 CPU ``t [R, M, V]`` and ``value [P, M, J]``
    (any strides; ``rows`` distinct): the sums of ``index_put_`` with ``accumulate``, bit for bit, on every
    thread instead of one. Call only when :func:`available` is True."""
    mod = _load()
    if mod is None:
        raise RuntimeError(f"the fused CPU kernels are not available: {_failed}")
    mod.scatter_rows_add(t, rows.long().contiguous(), slots.long().contiguous(), value)
