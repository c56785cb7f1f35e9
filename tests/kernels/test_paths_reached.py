"""Property tests that provably reach the code path they test: the fused CPU batch kernel inside the torch
backend on any shape, and the eager row pass it replaces. Each example counts the cells that go through the
path (a spy around the real function), so a threshold or a build that silently sends every cell elsewhere
fails here;
a kernel that cannot be built skips loudly, and fails under CI=true (helpers.skip_unless_built)."""

from __future__ import annotations

from unittest.mock import patch

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnprof.kernels import attention_stats, blocked, fused_rows
from helpers import assert_sums_close, random_batch, skip_unless_built, spec_for

SHAPES = dict(
    B=st.integers(1, 4),
    H=st.integers(1, 4),
    L=st.integers(1, 90),
    D=st.integers(8, 40),
    G=st.integers(1, 3),
    window=st.integers(1, 40),
    n_context=st.integers(0, 3),
    trailing=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)


def counted(function, cells=lambda *args: 1):
    """A spy around ``function`` and the list of what ``cells(*args)`` says each call handled."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(cells(*args))
        return function(*args, **kwargs)

    return spy, calls


def counted_slots(q, k, v, cu_q, cu_k, slot, *rest) -> int:
    """Counted cells of one :func:`fused_rows.batch_rows` call: those with a counted-cell slot."""
    return int((slot >= 0).sum())


def torch_and_reference(B, H, L, D, G, window, n_context, trailing, seed):
    q, k, v, padding, groups, tokens = random_batch(seed, B, H, L, D, G, trailing=trailing)
    spec = spec_for(G, L, window=min(window, L), n_context=n_context)
    args = dict(spec=spec, groups=groups, key_padding_mask=padding, tokens=tokens)
    out_ref, ref = attention_stats(q, k, v, backend="reference", **args)
    out, fast = attention_stats(q, k, v, backend="torch", **args)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    assert_sums_close(fast, ref, atol=1e-5, rtol=1e-5)
    return int((groups >= 0).sum())  # counted cells; the others only get the output (SDPA)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**SHAPES)
def test_fused_row_kernel_equals_the_reference_on_any_shape(**shape):
    skip_unless_built(fused_rows.available(), f"the fused CPU row kernel cannot be built: {fused_rows._failed}")
    spy, calls = counted(fused_rows.batch_rows, counted_slots)
    eager, eager_calls = counted(blocked._rows_eager)
    with patch.object(blocked, "FUSED_MIN_SCORES", 0), patch.object(fused_rows, "batch_rows", spy), \
            patch.object(blocked, "_rows_eager", eager):  # fmt: skip
        cells = torch_and_reference(**shape)
    assert len(calls) == 1 and calls[0] == cells  # the whole batch in one compiled call, every counted cell
    assert not eager_calls  # and none on the eager loop


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**SHAPES)
def test_eager_row_pass_equals_the_reference_on_any_shape(**shape):
    spy, calls = counted(blocked._rows_eager)
    with patch.object(blocked, "FUSED_MIN_SCORES", float("inf")), patch.object(blocked, "_rows_eager", spy):
        cells = torch_and_reference(**shape)
    assert len(calls) == cells  # every counted cell went through the eager pass
