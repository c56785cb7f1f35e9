"""attnprof.kernels: softmax attention that also returns group-wise sums of P.

Pure compute on ``q, k, v``; no model knowledge. Two entry points with interchangeable backends:

- :func:`attention_stats`: one call, one labeling; builds its own :class:`BatchPlan`.
- :func:`planned_stats`: one layer of a forward on a plan built once per forward
  (:func:`build_plan`), adding into the sums of every labeling of the plan (one assignment of
  cells to groups each) from one attention pass.
"""

from __future__ import annotations

import torch

from .accumulator import Accumulator
from .backends import BACKENDS, Backend, MissingExtra, add_result, get_backend, resolve_backend, triton_available
from .plan import BatchPlan, build_plan
from .reduce import CellResults, Target, tiled_zeros
from .spec import SUMMARIES, StatsSpec, check_qkv, empty_sums, refuse_non_finite, sum_shapes

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
    backend = get_backend(backend, q.device)
    B, H, L, _ = q.shape
    groups = torch.as_tensor(groups, device=q.device)
    if groups.shape != (B,):
        raise ValueError(f"groups must have shape [B] = [{B}], got {tuple(groups.shape)} (mismatched batch sizes?)")
    plan = build_plan(spec, groups[None], key_padding_mask, tokens, shape=(B, L), device=q.device)
    sums = _target(into, spec, H, q.device)
    out = planned_stats(q, k, v, plan, [Target({k: v[None] for k, v in sums.items()}, slice(0, 1))],
                        scale=scale, backend=backend)  # fmt: skip
    if backend.finish(plan) is not None:  # a verdict the backend deferred (triton: a host sync)
        refuse_non_finite(q, k, v)
    return out, sums


def planned_stats(q, k, v, plan: BatchPlan, targets, *, scale: float | None = None, backend: str = "auto"):
    """One attention layer on a plan: returns the output; adds the layer's sums of the plan's
    labelings into each :class:`Target` (one attention pass, whatever the number of labelings).

    Checks q, k, v shapes and dtypes against the plan (no pass over their values); NaN or Inf in
    them is refused from the row log-sum-exp and the output, which the pass computes anyway.
    """
    scale = check_qkv(q, k, v, scale)
    plan.check_fits(q)
    backend = get_backend(backend, q.device)
    with torch.no_grad():  # a forward-only op: the output carries no autograd history
        out, result = backend.cells(q, k, v, plan, scale)
        for target in targets:
            add_result(plan, result, target)
    return out


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
    "Accumulator",
    "Backend",
    "SUMMARIES",
    "BatchPlan",
    "CellResults",
    "MissingExtra",
    "StatsSpec",
    "Target",
    "attention_stats",
    "build_plan",
    "empty_sums",
    "get_backend",
    "planned_stats",
    "resolve_backend",
    "sum_shapes",
    "tiled_zeros",
    "triton_available",
]
