"""Check the fast kernels on a user's own model and batch before a long run.

Three comparisons: the profiled model's outputs against its plain outputs, every sum of the
backend that ran against the ``reference`` backend, and every sum against the sums of the
model's *own* attention maps (``attnprof.own_maps``: ``need_weights=True`` /
``output_attentions=True``), where the model can produce them.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import torch
from torch.utils._pytree import tree_leaves

from attnprof.kernels import resolve_backend
from attnprof.kernels.reference import stats_from_probs

from .adapters.mha import fastpath_disabled
from .own_maps import own_maps
from .recorder import Recorder
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
    """Run one batch plainly, through ``backend``, through ``reference`` and with the model's own maps.

    inputs: the model's arguments, a tuple (positional) or a dict (keyword).
    groups: the batch's group labels or codes; ``group_names`` defaults to the sorted labels.
    tokens: the batch's token ids ``[B, L]`` (needed with gene statistics, as ``Profiler.set_batch``).
    options: the other :class:`attnprof.Profiler` options (genes, window, panel, n_context, adapter, ...); the
             own maps' sums use only genes, window, panel and n_context.

    One row per compared quantity: the model output against the plain run, then every sum
    against ``reference`` and, where the model can show its maps, against the sums of its own
    maps. Columns: ``quantity``, ``backend`` (the one that ran, never ``auto``), ``against``,
    the max absolute error, the error relative to the largest expected magnitude, the
    tolerance for the model's dtype and whether it is met. The plain run uses the model's
    regular (non-fused) path, on which padded positions get ordinary outputs, so every
    output element is comparable.
    """
    if group_names is None:
        labels = np.asarray(groups)
        group_names = [str(g) for g in range(int(labels.max()) + 1)] if labels.dtype.kind in "iu" else sorted(
            {str(x) for x in labels.ravel()}
        )
    options = {"groups": group_names, **options}
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = torch.float32 if first is None else first.dtype
    ran = resolve_backend(backend, first.device if first is not None else torch.device("cpu"))
    tol = TOLERANCE.get(dtype, 1e-5)
    with fastpath_disabled():
        plain = _run(model, inputs)
    fast_out, fast = _profile_with(model, inputs, ran, groups, tokens, options)
    layers = fast.layers
    ref_out, ref = _profile_with(model, inputs, "reference", groups, tokens, options)
    rows = [_row("output", ran, "plain model output", np.concatenate([t.numpy().ravel() for t in fast_out]),
                 np.concatenate([t.numpy().ravel() for t in plain]), tol)]  # fmt: skip
    fast, ref = fast.group_sums(), ref.group_sums()  # per group: the own maps' sums know no blocks
    rows += [_row(name, ran, "reference", fast[name], ref[name], tol) for name in ref]
    own = _own_sums(model, inputs, groups, tokens, options, layers)
    if own is not None:
        how, sums = own
        rows += [_row(name, ran, f"own maps: {how}", fast[name], sums[name], tol) for name in sums]
    return pd.DataFrame(rows)


def _own_sums(model, inputs, groups, tokens, options, layers) -> tuple[str, dict] | None:
    """The sums of the model's own maps, stacked like a profile's (layers first); None without maps."""
    spec_of = Recorder(options["groups"], **{k: v for k, v in options.items() if k in _SPEC_OPTIONS})
    codes = spec_of.group_codes(groups)
    ids = None if tokens is None else torch.as_tensor(tokens).cpu()

    def sums_of(P, padding):  # per layer, as soon as its maps exist
        return stats_from_probs(P.cpu(), padding, codes, ids, replace(spec_of.spec, n_groups=len(spec_of.groups)))

    found = own_maps(model, inputs, sums_of)
    if found is None:
        return None
    how, per_layer = found
    if len(per_layer) != len(layers):
        raise ValueError(f"the model showed {len(per_layer)} attention maps per forward but attnprof profiled "
                         f"{len(layers)} layers: cannot pair them")  # fmt: skip
    return how, {name: np.stack([s[name].numpy() for s in per_layer]) for name in per_layer[0]}


_SPEC_OPTIONS = ("window", "genes", "panel", "n_context")


def _row(name, backend, against, value, reference, tol) -> dict:
    err = float(np.abs(value - reference).max()) if np.size(reference) else 0.0
    scale = float(np.abs(reference).max()) if np.size(reference) else 0.0
    return {
        "quantity": name,
        "backend": backend,
        "against": against,
        "max_abs_err": err,
        "max_rel_err": err / scale if scale > 0 else err,
        "tolerance": tol,
        "ok": bool(err <= tol * max(scale, 1.0)),
    }
