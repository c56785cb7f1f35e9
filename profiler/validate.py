"""Check the fast kernels on a user's own model and batch before a long run."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch.utils._pytree import tree_leaves

from .adapters.mha import fastpath_disabled
from .session import Profiler

#: Relative tolerance (to the largest reference magnitude) per compute dtype.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def _run(model, inputs):
    with torch.inference_mode():
        out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return [t.detach().float().cpu() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def _profile_with(model, inputs, backend, groups, tokens, options):
    with Profiler(model, backend=backend, **options) as prof:
        prof.set_batch(groups=groups, tokens=tokens)
        outputs = _run(model, inputs)
    return outputs, prof.profile


def validate(
    model: torch.nn.Module,
    inputs,
    *,
    groups,
    tokens=None,
    group_names=None,
    backend: str = "auto",
    **options,
) -> pd.DataFrame:
    """Run one batch plainly, through ``backend`` and through ``reference``; tabulate the errors.

    inputs: the model's arguments, a tuple (positional) or a dict (keyword).
    groups: the batch's group labels or codes; ``group_names`` defaults to the sorted labels.
    options: the other :class:`attnprof.Profiler` options (genes, window, panel, n_context, adapter).

    One row per compared quantity (the model output, then every sum), with the
    max absolute error, the error relative to the largest reference magnitude,
    the tolerance for the model's dtype and whether it is met. The plain run
    uses the model's regular (non-fused) path, on which padded positions get
    ordinary outputs, so every output element is comparable.
    """
    if group_names is None:
        labels = np.asarray(groups)
        group_names = [str(g) for g in range(int(labels.max()) + 1)] if labels.dtype.kind in "iu" else sorted(
            {str(x) for x in labels.ravel()}
        )
    options = {"groups": group_names, **options}
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    tol = TOLERANCE.get(dtype, 1e-5)
    with fastpath_disabled():
        plain = _run(model, inputs)
    fast_out, fast = _profile_with(model, inputs, backend, groups, tokens, options)
    ref_out, ref = _profile_with(model, inputs, "reference", groups, tokens, options)
    rows = [_row("output", backend, np.concatenate([t.numpy().ravel() for t in fast_out]),
                 np.concatenate([t.numpy().ravel() for t in plain]), tol)]  # fmt: skip
    rows += [_row(name, backend, fast.sums[name], ref.sums[name], tol) for name in ref.sums]
    return pd.DataFrame(rows)


def _row(name, backend, value, reference, tol) -> dict:
    err = float(np.abs(value - reference).max()) if np.size(reference) else 0.0
    scale = float(np.abs(reference).max()) if np.size(reference) else 0.0
    return {
        "quantity": name,
        "backend": backend,
        "max_abs_err": err,
        "max_rel_err": err / scale if scale > 0 else err,
        "tolerance": tol,
        "ok": bool(err <= tol * max(scale, 1.0)),
    }
