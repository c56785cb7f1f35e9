"""The Accumulator owns a run's sums: the same numbers as planned_stats into plain targets, on any layout; the
CPU store handed over without a copy; layers beyond the store; sums rebased onto given buffers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from attnprof.kernels import Accumulator, Target, build_plan, empty_sums, planned_stats
from helpers import random_batch, spec_for


def batch(seed, B=4, H=2, L=9, labelings=3, panel=(1, 3)):
    q, k, v, padding, groups, tokens = random_batch(seed, B, H, L, 16, 2)
    g = torch.Generator().manual_seed(seed + 1)
    lab = torch.stack([groups, *(torch.randint(-1, 2, (B,), generator=g) for _ in range(labelings - 1))])
    spec = spec_for(2, L, window=4, panel=panel)
    return spec, build_plan(spec, lab, padding, tokens), (q, k, v)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 3), st.integers(0, 4), st.sampled_from(["torch", "reference"]))
def test_accumulated_sums_equal_planned_stats_into_plain_sums(seed, labelings, capacity, backend):
    """Three layers (some beyond the store's ``capacity``) on two plans: every layer's sums, copied or handed over,
    equal planned_stats into separately allocated sums, bit for bit."""
    spec, plan, (q, k, v) = batch(seed, labelings=3)
    _, plan2, (q2, k2, v2) = batch(seed + 7, labelings=3)
    H = q.shape[1]
    acc = Accumulator(spec, H, labelings=labelings, backend=backend, layers=capacity)
    want = {}
    for i, layer in enumerate(("a", "b", "c")):
        plain = {n: torch.zeros(labelings, *s.shape, dtype=torch.float64) for n, s in empty_sums(spec, H).items()}
        for p, x in ((plan, (q * (i + 1), k, v)), (plan2, (q2, k2 * (i + 1), v2))):
            torch.testing.assert_close(acc.attend(layer, *x, p), planned_stats(*x, p, [Target(plain, slice(0, labelings))],
                                                                            backend=backend), rtol=0, atol=0)  # fmt: skip
        want[layer] = plain
    copied = acc.to_numpy()
    handed = acc.to_numpy(release=True)
    assert acc.layers == [] and "a" not in acc
    for name, value in copied.items():
        expected = np.stack([want[layer][name].numpy() for layer in ("a", "b", "c")])
        np.testing.assert_array_equal(value, expected, err_msg=name)
        np.testing.assert_array_equal(handed[name], expected, err_msg=name)


def test_the_store_is_handed_over_without_a_copy():
    spec, plan, (q, k, v) = batch(3)
    acc = Accumulator(spec, q.shape[1], layers=2, backend="torch")
    for layer in ("a", "b"):
        acc.attend(layer, q, k, v, plan)
    store = dict(acc._store)
    handed = acc.to_numpy(release=True)
    for name, value in handed.items():
        family = "genes" if name.startswith("recv") else "dense"
        assert np.shares_memory(value, store[family]) and not value.flags.writeable, name


def test_out_of_order_layers_are_copied_and_missing_ones_refused():
    spec, plan, (q, k, v) = batch(4)
    acc = Accumulator(spec, q.shape[1], layers=2, backend="torch")
    for layer in ("a", "b"):
        acc.attend(layer, q, k, v, plan)
    before = acc.to_numpy()
    with pytest.raises(KeyError, match="no sums for layers"):
        acc.to_numpy(["a", "z"])
    swapped = acc.to_numpy(["b", "a"], release=True)
    for name, value in swapped.items():
        np.testing.assert_array_equal(value, before[name][::-1], err_msg=name)
        assert not any(np.shares_memory(value, s) for s in acc._store.values())


def test_rebased_sums_go_into_the_given_buffers_only():
    """What a compiled graph's functionalized call does: the layer's sums are views of the buffers it passes."""
    spec, plan, (q, k, v) = batch(5)
    acc = Accumulator(spec, q.shape[1], backend="torch", layers=1)
    acc.attend("a", q, k, v, plan)
    own = [b.clone() for b in acc.buffers("a")]
    given = [torch.zeros_like(b) for b in own]
    with acc.rebased("a", given):
        acc.attend("a", q, k, v, plan)
    for mine, was, theirs in zip(acc.buffers("a"), own, given):
        assert torch.equal(mine, was)  # untouched
        assert torch.equal(theirs, was)  # one call's sums, as the first call left in the accumulator's own
    with pytest.raises(RuntimeError, match="laid out otherwise"):
        with acc.rebased("a", [g[:, :1] for g in given]):
            pass
