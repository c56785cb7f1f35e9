"""Whole-context maps (StatsSpec.map_bins / map_length): every backend equals the reference.

The reference bins P of each cell in the plainest code (kernels/reference.py); the torch backend's eager
row blocks and fused C++ row kernel, and the triton kernel (under TRITON_INTERPRET=1 on CPU, tiny shapes),
must give the same sums, compared as means with the tolerances of the other sums (1e-5; counts exactly).
"""

from __future__ import annotations

import importlib.util
import os
from unittest.mock import patch

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

from attnprof import Profile, Profiler, merge
from attnprof.kernels import StatsSpec, Target, attention_stats, blocked, build_plan, empty_sums, fused_rows
from attnprof.kernels import planned_stats, sum_shapes
from attnprof.kernels.spec import check_inputs

from helpers import assert_sums_close, random_batch, skip_unless_built

TRITON = importlib.util.find_spec("triton") is not None and (
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"  # set by conftest.py without CUDA
)
needs_triton = pytest.mark.skipif(not TRITON, reason="needs triton, and CUDA or TRITON_INTERPRET=1")
INTERPRET = TRITON and os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if INTERPRET:
    from test_sync import oplog  # noqa: F401 (a fixture: every op and launch of a layer call, and what syncs)


def with_map_means(sums: dict) -> dict:
    """The map sums as means per element (0 where no cell counts), the other sums unchanged (helpers'
    assert_sums_close turns those into means and compares counts exactly)."""
    out = dict(sums)
    count = sums["map_count"].double().unsqueeze(1)  # no head axis
    for name in ("map_sum", "map_sq"):
        out[name] = torch.where(count > 0, sums[name].double() / count.clamp(min=1), 0.0)
    return out


def assert_maps_close(actual: dict, expected: dict) -> None:
    assert_sums_close(with_map_means(actual), with_map_means(expected), atol=1e-5, rtol=1e-5)


def map_spec(G: int, L: int, bins: int, extra: int, window: int = 4) -> StatsSpec:
    """Every statistic at once (gene, panel, window, summaries) with maps over L + extra positions."""
    return StatsSpec(n_groups=G, window=window, vocab_size=12, panel=(1, 3, 4), n_context=2, map_bins=bins,
                     map_length=max(L + extra, bins))  # fmt: skip


def run(backend, batch, spec):
    q, k, v, padding, groups, tokens = batch
    return attention_stats(q, k, v, spec=spec, groups=groups, key_padding_mask=padding, tokens=tokens, backend=backend)


SHAPES = dict(
    B=st.integers(1, 5), H=st.integers(1, 3), L=st.integers(1, 70), D=st.integers(4, 24), G=st.integers(1, 3),
    bins=st.integers(1, 24), extra=st.integers(0, 30), trailing=st.booleans(), seed=st.integers(0, 2**31 - 1),
)  # fmt: skip


# ------------------------------------------------------------------ torch backend
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**SHAPES, dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
@example(B=4, H=2, L=70, D=8, G=2, bins=24, extra=0, trailing=False, seed=1, dtype=torch.float32)
@example(B=3, H=3, L=9, D=4, G=1, bins=1, extra=30, trailing=True, seed=2, dtype=torch.float32)
def test_torch_eager_equals_reference(B, H, L, D, G, bins, extra, trailing, seed, dtype):
    batch = random_batch(seed, B, H, L, D, G, dtype=dtype, trailing=trailing)
    spec = map_spec(G, L, bins, extra)
    _, ref = run("reference", batch, spec)
    with patch.object(blocked, "FUSED_MIN_SCORES", float("inf")):
        _, fast = run("torch", batch, spec)
    assert_maps_close(fast, ref)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**SHAPES)
@example(B=5, H=3, L=70, D=24, G=3, bins=24, extra=3, trailing=False, seed=3)
def test_fused_row_kernel_equals_reference(B, H, L, D, G, bins, extra, trailing, seed):
    skip_unless_built(fused_rows.available(), f"the fused CPU row kernel cannot be built: {fused_rows._failed}")
    batch = random_batch(seed, B, H, L, D, G, trailing=trailing)
    spec = map_spec(G, L, bins, extra)
    _, ref = run("reference", batch, spec)
    calls = []
    spy = lambda *a, **kw: calls.append(1) or fused_batch(*a, **kw)  # noqa: E731
    fused_batch = blocked._fused_batch
    with patch.object(blocked, "FUSED_MIN_SCORES", 0), patch.object(blocked, "_fused_batch", spy):
        _, fast = run("torch", batch, spec)
    assert calls == [1]  # the compiled kernel took the batch
    assert_maps_close(fast, ref)


@pytest.mark.parametrize("block_elems", [1, 97, 1 << 20])
def test_eager_row_blocks_of_any_size(block_elems, monkeypatch):
    """Row blocks of 1 row, of a prime number of scores and larger than the cell bin alike."""
    monkeypatch.setenv("ATTNPROF_FUSED", "0")
    q, k, v, padding, groups, tokens = batch = random_batch(5, 3, 2, 33, 8, 2)
    spec = map_spec(2, 33, 7, 5)
    _, ref = run("reference", batch, spec)
    _, fast = blocked.blocked_stats(check_inputs(q, k, v, padding, groups, tokens, spec, None), spec,
                                    block_elems=block_elems)  # fmt: skip
    assert_maps_close(fast, ref)


# ------------------------------------------------------------------ the definition, by hand
def uniform_batch(L: int, padded: list[int]):
    """One cell, one head, q = 0: every real row attends uniformly to the real keys."""
    q = torch.zeros(1, 1, L, 4)
    k, v = torch.randn(1, 1, L, 4), torch.randn(1, 1, L, 4)
    padding = torch.zeros(1, L, dtype=torch.bool)
    padding[0, padded] = True
    return q, k, v, padding, torch.tensor([0]), None


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_hand_computed_map(backend):
    """L = 6 over map_length 8 in 4 bins: bins {0, 1}, {2, 3}, {4, 5}, {6, 7}. Positions 2 and 3 are padding,
    so bin 1 has no real token and bin 3 lies past the batch: the real tokens are 0, 1, 4, 5, each row puts
    1/4 on each, so a query in bin 0 or 2 puts 2/4 on bin 0 and 2/4 on bin 2. Only (a, c) in {0, 2}^2 count."""
    spec = StatsSpec(n_groups=1, window=2, map_bins=4, map_length=8)
    _, sums = run(backend, uniform_batch(6, [2, 3]), spec)
    held = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    count = held[:, None] * held[None, :]
    torch.testing.assert_close(sums["map_count"][0], count, atol=0, rtol=0)
    torch.testing.assert_close(sums["map_sum"][0, 0], count * (2 / 4), atol=1e-7, rtol=1e-7)
    torch.testing.assert_close(sums["map_sq"][0, 0], count * (2 / 4) ** 2, atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_each_cells_rows_sum_to_one(backend):
    """One cell per group: per query bin the mean mass over all key bins is 1 (every real key is in a bin)."""
    q, k, v, padding, _, tokens = random_batch(11, 4, 3, 40, 8, 4)
    groups = torch.arange(4)
    spec = StatsSpec(n_groups=4, window=3, map_bins=6, map_length=45)
    _, sums = run(backend, (q, k, v, padding, groups, tokens), spec)
    rows = sums["map_sum"].sum(-1)  # [G, H, NB]
    held = sums["map_count"].amax(-1)[:, None, :].expand_as(rows) > 0  # query bins with real rows
    torch.testing.assert_close(rows[held], torch.ones_like(rows[held]), atol=1e-6, rtol=0)
    assert (rows[~held] == 0).all()


def test_batches_of_other_lengths_bin_alike():
    """The bins cover map_length, not the batch: a cell padded to 30 positions and trimmed to its 17 bin the same."""
    q, k, v, padding, groups, tokens = random_batch(3, 3, 2, 30, 8, 2, trailing=True)
    padding[:, 17:] = True
    padding[0, :17] = False
    spec = StatsSpec(n_groups=2, window=4, map_bins=5, map_length=32)
    _, long = run("torch", (q, k, v, padding, groups, None), spec)
    short = [x[..., :17, :] for x in (q, k, v)]
    _, trimmed = run("torch", (*short, padding[:, :17], groups, None), spec)
    for name in ("map_sum", "map_sq", "map_count"):
        torch.testing.assert_close(trimmed[name], long[name], atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------ contract checks
@pytest.mark.parametrize("bins, length, match", [
    (5, 3, "map_length >= map_bins"), (-1, 8, "map_bins must be in"), (0, 8, "without map_bins"),
    (2000, 4000, "map_bins must be in"),
])  # fmt: skip
def test_bad_binning_is_refused(bins, length, match):
    with pytest.raises(ValueError, match=match):
        StatsSpec(n_groups=1, map_bins=bins, map_length=length)


def test_real_tokens_past_map_length_are_refused_padding_is_not():
    spec = StatsSpec(n_groups=1, window=2, map_bins=2, map_length=4)
    q, k, v, padding, groups, _ = uniform_batch(6, [4, 5])
    run("torch", (q, k, v, padding, groups, None), spec)  # positions 4 and 5 are padding: fine
    padding[0, 5] = False
    with pytest.raises(ValueError, match="positions >= map_length=4.*at least 6"):
        run("torch", (q, k, v, padding, groups, None), spec)
    with pytest.raises(ValueError, match="positions >= map_length=4"):
        build_plan(spec, groups, padding)


def test_sum_shapes():
    shapes = sum_shapes(StatsSpec(n_groups=3, window=2, map_bins=5, map_length=9), 4)
    assert (shapes["map_sum"], shapes["map_sq"], shapes["map_count"]) == ((3, 4, 5, 5), (3, 4, 5, 5), (3, 5, 5))
    assert "map_sum" not in sum_shapes(StatsSpec(n_groups=3, window=2), 4)


# ------------------------------------------------------------------ the profiler
def encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()


def profiled(model, backend: str, seed: int, L: int = 14, map_length: int = 16) -> Profile:
    g = torch.Generator().manual_seed(seed)
    with Profiler(model, groups=["a", "b"], window=4, backend=backend, map_bins=4, map_length=map_length) as prof:
        for _ in range(2):
            x = torch.randn(3, L, 16, generator=g)
            mask = torch.rand(3, L, generator=g) < 0.3
            mask[:, 0] = False
            prof.set_batch(groups=["a", "b", "a"])
            with torch.no_grad():
                model(x, src_key_padding_mask=mask)
    return prof.profile


def test_profiler_maps_equal_the_reference_and_survive_save_load_merge(tmp_path):
    model = encoder()
    prof, ref = profiled(model, "torch", 0), profiled(model, "reference", 0)
    assert prof.map_length == 16 and prof.sums["map_sum"].shape[-2:] == (4, 4)
    for layer in range(2):
        assert_maps_close({k: torch.from_numpy(v[layer]) for k, v in prof.sums.items()},
                          {k: torch.from_numpy(v[layer]) for k, v in ref.sums.items()})  # fmt: skip
    m = prof.binned_map("a", prof.layers[1], 1)
    count = prof.group_sum("map_count", "a")[1]
    np.testing.assert_allclose(m[count > 0], (prof.group_sum("map_sum", "a")[1, 1] / count)[count > 0], rtol=1e-12)
    assert np.isnan(m[count == 0]).all()

    loaded = Profile.load(prof.save(tmp_path / "p.npz"))
    assert loaded.map_length == 16 and loaded.layout() == prof.layout()
    np.testing.assert_array_equal(loaded.binned_map("b", 0, 0), prof.binned_map("b", 0, 0))
    other = profiled(model, "torch", 1)
    both = merge([prof, other])
    assert both.map_length == 16
    for name in ("map_sum", "map_sq", "map_count"):
        np.testing.assert_allclose(both.sums[name], prof.sums[name] + other.sums[name], rtol=1e-12, atol=0)


def test_profiles_of_other_binning_do_not_merge():
    model = encoder()
    with pytest.raises(ValueError, match="map_length"):
        merge([profiled(model, "torch", 0), profiled(model, "torch", 1, map_length=20)])


def test_a_profile_without_maps_says_so():
    model = encoder()
    with Profiler(model, groups=["a"], window=2, backend="torch") as prof:
        prof.set_batch(groups=["a"])
        with torch.no_grad():
            model(torch.randn(1, 5, 16))
    with pytest.raises(ValueError, match="no whole-context maps"):
        prof.profile.binned_map("a", 0, 0)


# ------------------------------------------------------------------ triton
@needs_triton
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 3), H=st.integers(1, 2), L=st.integers(1, 40), D=st.integers(4, 16), G=st.integers(1, 3),
       bins=st.integers(1, 20), extra=st.integers(0, 10), trailing=st.booleans(), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.float16]))  # fmt: skip
@example(B=2, H=1, L=70, D=8, G=1, bins=70, extra=0, trailing=False, seed=4, dtype=torch.float32)  # 2 x 2 chunks
@example(B=3, H=2, L=40, D=16, G=2, bins=3, extra=8, trailing=True, seed=5, dtype=torch.float16)
def test_triton_equals_reference(B, H, L, D, G, bins, extra, trailing, seed, dtype):
    batch = [x.to(DEVICE) for x in random_batch(seed, B, H, L, D, G, dtype=dtype, trailing=trailing)]
    spec = map_spec(G, L, bins, extra)
    _, ref = run("reference", batch, spec)
    _, fast = run("triton", batch, spec)
    assert_maps_close({k: v.cpu() for k, v in fast.items()}, {k: v.cpu() for k, v in ref.items()})


@pytest.mark.skipif(not INTERPRET, reason="counts ops under the Triton interpreter (CPU)")
def test_triton_map_pass_never_syncs(oplog):
    """A layer call with maps on the triton backend: one more launch, no host sync (as tests/test_sync.py)."""
    q, k, v, padding, _, tokens = random_batch(7, 4, 2, 40, 16, 3)
    groups = torch.tensor([0, 2, -1, 0])
    spec = map_spec(3, 40, 5, 8)
    plan = build_plan(spec, groups, padding, tokens)
    targets = [Target({name: x[None] for name, x in empty_sums(spec, 2).items()}, slice(0, 1))]
    planned_stats(q, k, v, plan, targets, backend="triton")  # the first call derives the plan's kernel inputs
    with oplog:
        planned_stats(q, k, v, plan, targets, backend="triton")
    assert oplog.syncs == [], oplog.syncs
    assert [name for name, _ in oplog.ops].count("launch _maps_kernel") == 1
