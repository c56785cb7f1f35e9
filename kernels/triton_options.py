"""How the triton backend computes: the precision policy for fp32 inputs and the deterministic mode.

Precision policy (``precision=``), for **fp32** q, k, v only (fp16 and bf16 inputs always run on
tensor cores in their own dtype, fp32 accumulation):

- ``"tf32x3"`` (default): tensor cores with error compensation. Each fp32 operand is split into a
  tf32 ``hi`` and the tf32 of the rest ``lo``; ``a.b = hi.hi + hi.lo + lo.hi`` (fp32 accumulation):
  about fp32's own error, at three tensor-core products per dot. Meets the exactness contract.
- ``"fp16x3"``: the same split with fp16 halves (11 + 11 bits) and three full-rate fp16 products (tf32
  runs at half the fp16 rate, and its 32-bit operands need register shuffles before ``P @ V``): about
  half the tensor-core time of ``tf32x3`` and meets the contract, but needs |q|, |k|, |v| < 65504 (fp16's
  range: a larger entry overflows and is reported as non-finite input). Not the default for that reason.
- ``"tf32"``: one tensor-core product on tf32-rounded operands (10 mantissa bits). Faster; does NOT
  meet the contract (see docs/gpu.md for the measured error).
- ``"bf16"``, ``"fp16"``: operands rounded to that dtype (round to nearest even), fp32 accumulation.
  Do NOT meet the contract (measured in docs/gpu.md); ``"fp16"`` also overflows above 65504.
- ``"ieee"``: true fp32 products on the FMA pipe (no tensor cores): the old behaviour, ~10x slower.

Deterministic mode (``deterministic=True``): every kernel launches with a configuration pinned per
(head dim, dtype class): no autotuning, so every run, shard, rank and resumed run sums in the same
order; no order-dependent float atomics anywhere on the path (the gene path's repeated-id
``index_add_`` is replaced by a fixed-order gather-sum). Also no autotuning sync at the first call.

Where the options come from, first that is set: the explicit ``precision=`` / ``deterministic=``
arguments of the triton functions (:func:`.triton_stats.triton_cells`, :func:`.triton_stats.cell_results`,
:func:`.triton_forward.triton_forward`); a ``with triton_options(...)`` block (reaches
``planned_stats`` / ``attention_stats`` / a profiling run without changing their signatures); the
environment variables ``ATTNPROF_PRECISION`` and ``ATTNPROF_DETERMINISTIC`` (``1`` / ``0``); the defaults.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass

import torch

PRECISIONS = ("tf32x3", "fp16x3", "tf32", "bf16", "fp16", "ieee")
DEFAULT_PRECISION = "tf32x3"
#: Policies that meet the exactness contract against ``reference`` on fp32 inputs (tests/test_triton_precision.py).
EXACT_PRECISIONS = ("tf32x3", "fp16x3", "ieee")


@dataclass(frozen=True)
class TritonOptions:
    precision: str = DEFAULT_PRECISION
    deterministic: bool = False


_current: contextvars.ContextVar[dict] = contextvars.ContextVar("attnprof_triton_options", default={})


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return precision


@contextlib.contextmanager
def triton_options(*, precision: str | None = None, deterministic: bool | None = None):
    """Set the triton backend's options for the calls inside the block (nested blocks override)."""
    changes = {}
    if precision is not None:
        changes["precision"] = check_precision(precision)
    if deterministic is not None:
        changes["deterministic"] = bool(deterministic)
    token = _current.set({**_current.get(), **changes})
    try:
        yield
    finally:
        _current.reset(token)


def resolve(precision: str | None = None, deterministic: bool | None = None) -> TritonOptions:
    """The options in force: explicit arguments, then ``triton_options``, then the environment, then defaults."""
    block = _current.get()
    if precision is None:
        precision = block.get("precision") or os.environ.get("ATTNPROF_PRECISION") or DEFAULT_PRECISION
    if deterministic is None:
        deterministic = block.get("deterministic")
    if deterministic is None:
        deterministic = os.environ.get("ATTNPROF_DETERMINISTIC", "0").strip().lower() in ("1", "true", "yes")
    return TritonOptions(check_precision(precision), bool(deterministic))


def dot_precision(dtype: torch.dtype, precision: str = DEFAULT_PRECISION) -> str:
    """The kernels' ``DOT_PREC`` constexpr: the policy for fp32 inputs, ``"native"`` for 16-bit ones."""
    return check_precision(precision) if dtype == torch.float32 else "native"
