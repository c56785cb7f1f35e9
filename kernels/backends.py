"""The backends behind one small protocol: per-cell results from q, k, v and a plan; a finish step.

A :class:`Backend` turns one layer's ``q, k, v [B, H, L, D]`` on a :class:`~.plan.BatchPlan` into the
attention output and what the reduction adds into the sums:

- ``torch`` and ``triton``: :class:`~.features.CellResults`, one row per counted cell, which
  :func:`~.reduce.reduce_into` adds into every labeling's groups with one-hot matmuls;
- ``reference`` (the oracle): :class:`GroupSums`, each labeling's group sums computed plainly from the
  materialized P, added as they are (it shares none of the fast paths' reduction).

``finish(plan)`` gives the verdict a backend deferred: the index (in call order) of the first call on the
plan whose q, k or v held NaN or Inf, or None. Only the triton backend defers it (checking in every layer
would wait for the device); the others refuse non-finite input in the call itself.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch

from .reduce import reduce_into
from .reference import attention_probs, refuse_non_finite_inputs, stats_from_probs
from .spec import Inputs

BACKENDS = ("auto", "reference", "torch", "triton")

TRITON_MISSING = 'the triton backend needs Triton, which is not installed here: pip install "attnprof[gpu]"'


class MissingExtra(ImportError, ValueError):
    """An optional dependency is not installed (also a ValueError: the command line reports it as bad input)."""


@functools.cache
def triton_available() -> bool:
    """True when Triton imports (the ``gpu`` extra); the CPU install and its torch backend need none."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _warn_no_triton() -> None:  # once per process
    warnings.warn('Triton is not installed here (pip install "attnprof[gpu]" for the fast GPU kernels): '
                  "the torch backend runs on CUDA instead", RuntimeWarning, stacklevel=4)  # fmt: skip


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` is triton on CUDA (torch there too, with a warning, when Triton is not installed) and torch
    elsewhere; ``triton`` without Triton raises :class:`MissingExtra` saying how to install it."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if torch.device(device).type != "cuda":
            return "torch"
        if triton_available():
            return "triton"
        _warn_no_triton()
        return "torch"
    if backend == "triton" and not triton_available():
        raise MissingExtra(f'{TRITON_MISSING} (or choose backend="torch")')
    return backend


@dataclass
class GroupSums:
    """Group sums of every labeling of a plan: name -> ``[N + 1, G, ...]`` float64 (``sum_shapes`` with a
    labeling axis), the gene sums over the plan's genes (``plan.genes``) in their last axis."""

    sums: dict


class Backend:
    """One layer call on a plan: ``cells(q, k, v, plan, scale) -> (out, CellResults | GroupSums)``."""

    name = ""

    def cells(self, q, k, v, plan, scale: float):
        raise NotImplementedError

    def finish(self, plan) -> int | None:
        return None


class ReferenceBackend(Backend):
    name = "reference"

    def cells(self, q, k, v, plan, scale: float):
        inp = Inputs(q, k, v, plan.padding, plan.labelings[0], plan.tokens, scale)
        refuse_non_finite_inputs(inp)
        P = attention_probs(inp)
        out = torch.einsum("bhij,bhjd->bhid", P, v.float()).to(q.dtype)
        per_labeling = [stats_from_probs(P, plan.padding, labeling, plan.tokens, plan.spec) for labeling in plan.labelings]
        sums = {}
        for name in per_labeling[0]:
            value = torch.stack([s[name] for s in per_labeling])
            sums[name] = value[..., plan.genes] if name.startswith("recv") else value  # onto the batch's genes
        return out, GroupSums(sums)


class TorchBackend(Backend):
    name = "torch"

    def cells(self, q, k, v, plan, scale: float):
        from .blocked import blocked_cells

        return blocked_cells(q, k, v, plan, scale)


class TritonBackend(Backend):
    name = "triton"

    def cells(self, q, k, v, plan, scale: float):
        from .triton_stats import triton_cells  # imported lazily: needs a working Triton

        return triton_cells(q, k, v, plan, scale)

    def finish(self, plan) -> int | None:
        if "triton" not in plan.cache:  # no call of this backend on the plan
            return None
        from .triton_stats import first_non_finite

        return first_non_finite(plan)


BACKEND_CLASSES = {cls.name: cls for cls in (ReferenceBackend, TorchBackend, TritonBackend)}


def add_group_sums(plan, result: GroupSums, target) -> None:
    """Add the reference's group sums of the target's labelings into it (gene sums at its gene slots)."""
    slots = plan.genes if target.genes is None else target.genes
    for name, value in result.sums.items():
        if name not in target.sums:
            continue
        value = value[target.labelings]
        dest = target.sums[name]
        if name.startswith("recv"):
            dest.index_add_(dest.dim() - 1, slots, value)
        else:
            dest += value


def get_backend(backend: str | Backend, device) -> Backend:
    """The :class:`Backend` named (``auto`` resolved for ``device``; see :func:`resolve_backend`), or the one given."""
    return backend if isinstance(backend, Backend) else BACKEND_CLASSES[resolve_backend(backend, device)]()


def add_result(plan, result, target) -> None:
    """Add a backend's result of one layer (:class:`CellResults` or the reference's :class:`GroupSums`) into
    ``target``'s labelings (a :class:`~.reduce.Target`)."""
    if isinstance(result, GroupSums):
        add_group_sums(plan, result, target)
    else:
        reduce_into(plan, result, target)
