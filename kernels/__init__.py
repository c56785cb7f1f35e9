"""attnprof.kernels: softmax attention that also returns group-wise sums of P.

Pure compute on ``q, k, v``; no model knowledge. Two entry points with interchangeable backends:

- :func:`attention_stats`: one call, one labeling; builds its own :class:`BatchPlan`.
- :func:`planned_stats`: one layer of a forward on a plan built once per forward
  (:func:`build_plan`), adding into the sums of every labeling of the plan (one assignment of
  cells to groups each) from one attention pass.
"""

from __future__ import annotations

import functools
import warnings

import torch

from .blocked import blocked_cells
from .plan import BatchPlan, build_plan
from .reduce import CellResults, Target, reduce_into, tiled_zeros
from .reference import reference_planned
from .spec import SUMMARIES, Inputs, StatsSpec, check_qkv, empty_sums, sum_shapes

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


def attention_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    spec: StatsSpec,
    groups,
    key_padding_mask: torch.Tensor | None = None,
    tokens: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
    into: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Softmax attention over ``[B, H, L, D]`` inputs plus the batch's statistic sums.

    Returns the output (as ``scaled_dot_product_attention`` gives it, padded
    keys masked, in the input dtype) and a dict of float64 sums on the input's
    device, shaped as :func:`sum_shapes` says. Forward only: no gradient flows
    through the output.

    ``into``: running sums (e.g. a whole run's) to add the batch's sums into and
    return, instead of new zeros: it saves a vocabulary-sized pass per call.
    """
    check_qkv(q, k, v, scale)
    name = resolve_backend(backend, q.device)
    B, H, L, _ = q.shape
    groups = torch.as_tensor(groups, device=q.device)
    if groups.shape != (B,):
        raise ValueError(f"groups must have shape [B] = [{B}], got {tuple(groups.shape)} (mismatched batch sizes?)")
    plan = build_plan(spec, groups[None], key_padding_mask, tokens, shape=(B, L), device=q.device)
    sums = _target(into, spec, H, q.device)
    out = planned_stats(q, k, v, plan, [Target({k: v[None] for k, v in sums.items()}, slice(0, 1))],
                        scale=scale, backend=name)  # fmt: skip
    if name == "triton":  # its layer calls defer the NaN/Inf verdict (a host sync) to the caller
        from .triton_stats import raise_if_non_finite  # resolve_backend checked that Triton imports

        raise_if_non_finite(plan, q, k, v)
    return out, sums


def planned_stats(q, k, v, plan: BatchPlan, targets, *, scale: float | None = None, backend: str = "auto"):
    """One attention layer on a plan: returns the output; adds the layer's sums of the plan's
    labelings into each :class:`Target` (one attention pass, whatever the number of labelings).

    Checks q, k, v shapes and dtypes against the plan (no pass over their values); NaN or Inf in
    them is refused from the row log-sum-exp and the output, which the pass computes anyway.
    """
    scale = check_qkv(q, k, v, scale)
    B, H, L, _ = q.shape
    if (B, L) != (plan.B, plan.L) or q.device != plan.device:
        raise ValueError(
            f"q has {B} cells of {L} positions on {q.device}, but the batch plan is for {plan.B} cells of "
            f"{plan.L} positions on {plan.device}: build the plan from this batch"
        )
    name = resolve_backend(backend, q.device)
    with torch.no_grad():  # a forward-only op: the output carries no autograd history
        if name == "reference":
            return reference_planned(Inputs(q, k, v, plan.padding, plan.labelings[0], plan.tokens, scale), plan, targets)
        if name == "torch":
            out, cells = blocked_cells(q, k, v, plan, scale)
        else:
            out, cells = _triton_cells(q, k, v, plan, scale)
        for target in targets:
            reduce_into(plan, cells, target)
    return out


def _triton_cells(q, k, v, plan: BatchPlan, scale: float):
    from .triton_stats import triton_cells  # imported lazily: needs a working triton

    return triton_cells(q, k, v, plan, scale)


def _target(into, spec: StatsSpec, n_heads: int, device) -> dict[str, torch.Tensor]:
    if into is None:
        return empty_sums(spec, n_heads, device=device)
    shapes = sum_shapes(spec, n_heads)
    wrong = [k for k in shapes if k not in into or tuple(into[k].shape) != shapes[k] or into[k].dtype != torch.float64]
    if wrong or into.keys() != shapes.keys():
        raise ValueError(f"into= must hold float64 sums shaped as sum_shapes(spec, {n_heads}); wrong: {wrong}")
    return into


__all__ = [
    "BACKENDS",
    "SUMMARIES",
    "BatchPlan",
    "CellResults",
    "MissingExtra",
    "StatsSpec",
    "Target",
    "attention_stats",
    "build_plan",
    "empty_sums",
    "planned_stats",
    "resolve_backend",
    "sum_shapes",
    "tiled_zeros",
    "triton_available",
]
