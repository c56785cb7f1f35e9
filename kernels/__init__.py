"""attnprof.kernels: softmax attention that also returns group-wise sums of P.

Pure compute on ``q, k, v``; no model knowledge. One entry point,
:func:`attention_stats`, with interchangeable backends.
"""

from __future__ import annotations

import torch

from .blocked import blocked_stats
from .reference import reference_stats
from .spec import SUMMARIES, StatsSpec, check_inputs, empty_sums, sum_shapes

BACKENDS = ("auto", "reference", "torch", "triton")


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` is triton on CUDA and torch elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if torch.device(device).type == "cuda" else "torch"
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
    inp = check_inputs(q, k, v, key_padding_mask, groups, tokens, spec, scale)
    name = resolve_backend(backend, q.device)
    sums = _target(into, spec, q.shape[1], q.device)
    with torch.no_grad():  # a forward-only op: the output carries no autograd history
        if name == "reference":
            return reference_stats(inp, spec, sums)
        if name == "torch":
            return blocked_stats(inp, spec, sums)
        from .triton_stats import triton_stats  # imported lazily: needs a working triton

        return triton_stats(inp, spec, sums)


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
    "StatsSpec",
    "attention_stats",
    "empty_sums",
    "resolve_backend",
    "sum_shapes",
]
