"""The triton backend equals the reference on the output, the log-sum-exp and every statistic.

Without CUDA this runs under TRITON_INTERPRET=1 (tests/conftest.py), where the
kernels use one 32x32 tile config: L = 1 and 7 fit in one tile, L = 65 and 130
leave a ragged last tile, and a cell whose first 33+ positions are padding
gives query rows whose first key tiles are all masked.

Tolerances. fp32: 1e-5 on outputs, log-sum-exps and every statistic as a mean
(what the torch backend meets). fp16: the kernels compute scores in fp32 from
the same fp16 inputs as the reference, so the log-sum-exps and statistics keep
1e-5; the output is rounded to fp16 and, as in every flash kernel, P is rounded
to fp16 before P @ V, each costing at most 2**-11 * max|v|: atol = 2**-10 * max|v|.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton", reason="the triton backend is an extra: pip install \"attnprof[gpu]\"")
import triton.language as tl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from attnprof import Profiler
from attnprof.kernels import StatsSpec, attention_stats, sum_shapes
from attnprof.kernels.triton_common import INTERPRET
from attnprof.kernels.triton_forward import triton_forward
from attnprof.kernels.triton_stats import exp2_fma

from helpers import assert_sums_close, random_batch, spec_for

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRET), reason="needs CUDA or TRITON_INTERPRET=1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP16, FP32 = torch.float16, torch.float32


def batch(seed, B, H, L, D, dtype=FP32):
    """random_batch (cell 0 full, cell 1 one real token, padding anywhere), plus a cell 2 whose real
    tokens are only the last quarter, and fixed groups: codes 1 and 3 empty, cell 3 not counted."""
    q, k, v, padding, _, tokens = random_batch(seed, B, H, L, D, n_groups=4, dtype=dtype)
    if B > 2:
        padding[2] = torch.arange(L) < L - max(1, L // 4)
    groups = torch.tensor([0, 2, 0, -1, 2, 0])[:B]
    return [x.to(DEVICE) for x in (q, k, v, padding, groups, tokens)]


def out_tol(v):
    return dict(atol=2**-10 * v.abs().max().item(), rtol=0) if v.dtype == FP16 else dict(atol=1e-5, rtol=1e-5)


def both(q, k, v, padding, groups, tokens, spec):
    kw = dict(spec=spec, groups=groups, key_padding_mask=padding, tokens=tokens)
    return attention_stats(q, k, v, backend="triton", **kw), attention_stats(q, k, v, backend="reference", **kw)


@pytest.mark.parametrize("dtype", [FP32, FP16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("L, D", [(1, 16), (7, 24), (65, 8), (130, 32), (40, 128)])
def test_forward_is_sdpa_with_key_padding_and_keeps_the_lse(L, D, dtype):
    q, k, v, padding, _, _ = batch(L, 4, 2, L, D, dtype)
    scale = 0.3
    out, lse = triton_forward(q, k, v, padding, scale=scale)
    keep = ~padding[:, None, None, :]
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=keep, scale=scale)
    scores = torch.einsum("bhid,bhjd->bhij", q.float(), k.float()) * scale
    assert out.dtype == dtype and lse.dtype == FP32 and lse.shape == padding.shape[:1] + q.shape[1:3]
    torch.testing.assert_close(out.float(), expected, **out_tol(v))  # padded query rows included
    torch.testing.assert_close(lse, scores.masked_fill(~keep, float("-inf")).logsumexp(-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "B, H, L, D, window, n_context, dtype",
    [
        (5, 3, 1, 16, 4, 2, FP32),  # one token per cell, window > L
        (5, 2, 7, 24, 3, 2, FP32),  # window < L, head dim not a power of two
        (5, 2, 7, 8, 64, 0, FP16),  # no context tokens, head dim < 16
        (5, 3, 65, 16, 20, 2, FP32),  # ragged last tile
        (5, 2, 65, 32, 65, 3, FP16),  # window = L
        (5, 2, 130, 32, 200, 2, FP32),  # window > L over several tiles
        (4, 2, 130, 16, 40, 1, FP16),
    ],
    ids=lambda x: str(x).replace("torch.", ""),
)
def test_stats_equal_reference(B, H, L, D, window, n_context, dtype):
    q, k, v, padding, groups, tokens = batch(B + L, B, H, L, D, dtype)
    spec = spec_for(4, L, window=window, n_context=n_context)  # vocab 12, panel (1, 3, 4): ids repeat
    (out, sums), (out_ref, ref) = both(q, k, v, padding, groups, tokens, spec)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), out_ref.float(), **out_tol(v))
    assert_sums_close(sums, ref, atol=1e-5, rtol=1e-5)
    assert {name: tuple(x.shape) for name, x in sums.items()} == sum_shapes(spec, H)
    assert all(x.dtype == torch.float64 for x in sums.values())


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 4),
    H=st.integers(1, 3),
    L=st.integers(1, 70),
    D=st.integers(1, 40),
    G=st.integers(1, 3),
    window=st.integers(1, 80),
    n_context=st.integers(0, 4),
    fp16=st.booleans(),
    trailing=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_stats_equal_reference_random(B, H, L, D, G, window, n_context, fp16, trailing, seed):
    dtype = FP16 if fp16 else FP32
    data = [x.to(DEVICE) for x in random_batch(seed, B, H, L, D, G, dtype=dtype, trailing=trailing)]
    spec = spec_for(G, L, window=window, n_context=n_context)
    (out, sums), (out_ref, ref) = both(*data, spec)
    torch.testing.assert_close(out.float(), out_ref.float(), **out_tol(data[2]))
    assert_sums_close(sums, ref, atol=1e-5, rtol=1e-5)


def test_strided_inputs_as_the_mha_adapter_makes_them():
    """q, k, v as views of one packed projection [B, L, 3 * H * D], heads transposed: no copies needed."""
    B, H, L, D = 3, 2, 40, 16
    _, _, _, padding, groups, tokens = batch(2, B, H, L, D)
    packed = torch.randn(B, L, 3 * H * D, device=DEVICE)
    q, k, v = (x.view(B, L, H, D).transpose(1, 2) for x in packed.chunk(3, dim=-1))
    assert not q.is_contiguous()
    spec = spec_for(4, L, window=10)
    (out, sums), (out_ref, ref) = both(q, k, v, padding, groups, tokens, spec)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    assert_sums_close(sums, ref, atol=1e-5, rtol=1e-5)


def test_repeated_panel_ids_with_padding_between():
    """Cell 0: panel ids 3 and 1 three times each (a fourth 3 and a second 5 are padding), 4 absent;
    cell 1: 1 once and 4 five times, 3 and 5 absent."""
    q, k, v, padding, _, _ = batch(3, 2, 2, 12, 16)
    tokens = torch.tensor([[3, 3, 1, 3, 2, 1, 0, 3, 5, 5, 1, 2], [1, 0, 0, 2, 2, 2, 4, 4, 4, 4, 4, 4]], device=DEVICE)
    padding[:] = torch.tensor([[0, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0], [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]]) > 0
    spec = StatsSpec(n_groups=1, window=5, vocab_size=6, panel=(3, 1, 5, 4), n_context=2)
    groups = torch.zeros(2, dtype=torch.long, device=DEVICE)
    (_, sums), (_, ref) = both(q, k, v, padding, groups, tokens, spec)
    assert ref["pair_count"][0].tolist() == [[1, 1, 1, 0], [1, 2, 1, 1], [1, 1, 1, 0], [0, 1, 0, 1]]
    assert_sums_close(sums, ref, atol=1e-5, rtol=1e-5)


def test_cells_not_counted_give_outputs_only():
    q, k, v, padding, _, tokens = batch(4, 3, 2, 20, 16)
    groups = torch.full((3,), -1, device=DEVICE)
    (out, sums), (out_ref, _) = both(q, k, v, padding, groups, tokens, spec_for(2, 20))
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    assert all(not x.any() for x in sums.values())


def test_transformer_encoder_profile_matches_torch_backend():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    B, L, V = 3, 14, 20
    x = torch.randn(B, L, 16)
    tokens = torch.randint(0, V, (B, L))
    tokens[0, :6] = torch.tensor([2, 5, 7, 5, 2, 9])  # panel ids, 5 and 2 repeated
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[1, 9:] = True  # trailing padding
    mask[2, [0, 4, 5]] = True  # padding between real tokens
    labels = ["male", "female", "male"]

    def profiled(backend):
        with Profiler(model, groups=["female", "male", "other"], genes=V, window=8, panel=[2, 5, 7], n_context=2,
                      backend=backend) as prof:  # fmt: skip
            ys = []
            for step in range(2):  # two batches accumulate
                prof.set_batch(groups=labels, tokens=tokens)
                with torch.no_grad():
                    ys.append(model(x.flip(0) if step else x, src_key_padding_mask=mask.flip(0) if step else mask))
        return ys, prof.profile

    ys, profile = profiled("triton")
    ys_torch, profile_torch = profiled("torch")
    with torch.no_grad():
        plain = model(x, src_key_padding_mask=mask)
    for y, y_torch in zip(ys, ys_torch):
        torch.testing.assert_close(y, y_torch, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ys[0], plain, atol=1e-5, rtol=1e-5)
    assert profile.layers == profile_torch.layers and len(profile.layers) == 2
    assert profile.sums.keys() == profile_torch.sums.keys()
    for name, value in profile.sums.items():
        assert np.allclose(value, profile_torch.sums[name]), name
    assert profile.group_sums()["pair_count"].sum() > 0 and profile.group_sums()["cells"][0].tolist() == [2, 4, 0]


def test_ragged_lengths_in_one_batch():
    """Cells of 1 to 300 real tokens side by side (trailing padding, as batches of ranked genes are,
    and one cell with padding scattered inside): every statistic equals the reference."""
    B, H, L, D = 5, 2, 300, 16
    q, k, v, _, _, tokens = batch(300, B, H, L, D)
    lengths = torch.tensor([1, 77, 300, 180, 33])
    padding = (torch.arange(L) >= lengths[:, None]).to(DEVICE)
    padding[4, :20] = True  # real tokens 20..32 only
    groups = torch.tensor([0, 1, 1, 0, 1], device=DEVICE)
    spec = spec_for(2, L, window=40, n_context=3)
    (out, sums), (out_ref, ref) = both(q, k, v, padding, groups, tokens, spec)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    assert_sums_close(sums, ref, atol=1e-5, rtol=1e-5)


def test_many_labelings_in_one_pass_equal_the_reference_per_labeling():
    """One triton pass on a plan of 6 labelings (observed + 5 permutations, -1 cells moving around) of a
    ragged batch gives, for each labeling, the reference's sums of that labeling alone."""
    from attnprof.kernels import Target, build_plan, empty_sums, planned_stats

    B, H, L, D, G = 6, 2, 70, 16, 3
    q, k, v, _, _, tokens = batch(11, B, H, L, D)
    padding = (torch.arange(L) >= torch.tensor([70, 1, 33, 64, 12, 50])[:, None]).to(DEVICE)
    g = torch.Generator().manual_seed(5)
    labelings = torch.stack([torch.randint(-1, G, (B,), generator=g) for _ in range(6)]).to(DEVICE)
    spec = spec_for(G, L, window=20, n_context=3)
    plan = build_plan(spec, labelings, padding, tokens)
    sums = {name: x.expand(6, *x.shape).clone() for name, x in empty_sums(spec, H, device=DEVICE).items()}
    planned_stats(q, k, v, plan, [Target(sums, slice(0, 6))], backend="triton")
    for i in range(6):
        kw = dict(spec=spec, groups=labelings[i], key_padding_mask=padding, tokens=tokens, backend="reference")
        _, ref = attention_stats(q, k, v, **kw)
        assert_sums_close({name: x[i] for name, x in sums.items()}, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter, on the NaN itself
@pytest.mark.parametrize("where, name", [("q", "q"), ("k", "k"), ("v", "v")])
def test_non_finite_inputs_are_named(where, name):
    """The layer call does not wait for the device to look: kernel 1 folds every row's log-sum-exp and
    output into the statistics' checksum, and the caller checks it (attention_stats: at once)."""
    q, k, v, padding, groups, tokens = batch(2, 3, 2, 20, 16)
    x = dict(q=q, k=k, v=v)
    x[where] = x[where].clone()
    x[where][1, 0, 0 if where == "q" else 3, 2] = float("inf") if where == "v" else float("nan")
    spec = spec_for(4, 20)
    with pytest.raises(ValueError, match=f"{name} contains NaN or Inf"):
        attention_stats(**x, spec=spec, groups=groups, key_padding_mask=padding, tokens=tokens, backend="triton")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_non_finite_layer_calls_are_found_after_the_fact():
    """Three layer calls on one plan, the second with an Inf in v: one check afterwards names call 1."""
    from attnprof.kernels import Target, build_plan, empty_sums, planned_stats
    from attnprof.kernels.triton_stats import first_non_finite

    q, k, v, padding, groups, tokens = batch(4, 3, 2, 20, 16)
    spec = spec_for(4, 20)
    plan = build_plan(spec, groups, padding, tokens)
    targets = [Target({name: x[None] for name, x in empty_sums(spec, 2, device=DEVICE).items()})]
    bad = v.clone()
    bad[2, 1, 5, 0] = float("inf")
    for x in (v, bad, v):
        planned_stats(q, k, x, plan, targets, backend="triton")
    assert first_non_finite(plan) == 1
    assert first_non_finite(plan) is None  # checked calls are forgotten
    planned_stats(q, k, v, plan, targets, backend="triton")
    assert first_non_finite(plan) is None


def test_tiles_visited_scale_with_real_tokens():
    """The kernels' own debug counters (compiled in only when asked): kernel 1 visits, for every query
    tile, the key tiles up to the cell's extent (one past its last real token); the column kernel
    visits query tiles only for key tiles inside the extent. So trailing padding costs nothing in the
    key loops and the column pass scales with the square of the real length."""
    from attnprof.kernels.triton_forward import extents, key_bias
    from attnprof.kernels.triton_stats import cell_results

    from attnprof.kernels import triton_forward as kf
    from attnprof.kernels import triton_stats as ks

    H, L, D = 2, 128, 16
    fwd, col = kf._forward_kernel.configs[0].kwargs, ks._columns_kernel.configs[0].kwargs
    assert len(kf._forward_kernel.configs) == len(ks._columns_kernel.configs) == 1  # the interpreter's tiles
    q, k, v, _, _, _ = batch(7, 4, H, L, D)
    n_real = torch.tensor([1, 40, 128, 64])
    padding = (torch.arange(L) >= n_real[:, None]).to(DEVICE)
    padding[3, :50] = True  # real 50..63: the extent (64), not the count (14), bounds the loops
    extent = torch.tensor([1, 40, 128, 64])

    def visited(padding, cells):
        tiles = {name: torch.zeros(4 * H * L, dtype=torch.int32, device=DEVICE) for name in ("forward", "columns")}
        inv_n = (~padding).sum(1).float().reciprocal()
        cell_results(q, k, v, 0.25, bias=key_bias(padding), extent=extents(padding), inv_n=inv_n,
                     cells=cells, window=8, tiles=tiles)  # fmt: skip
        return {name: int(t.sum()) for name, t in tiles.items()}

    def cdiv(a, b):
        return -(-a // b)

    cells = torch.tensor([0, 1, 2, 3], device=DEVICE)
    query_tiles = cdiv(L, fwd["BLOCK_M"])  # kernel 1: every query tile (padded rows get outputs too) ...
    key_tiles = cdiv(extent, fwd["BLOCK_N"])  # ... visits the key tiles up to the extent
    col_tiles = cdiv(extent, col["BLOCK_N"])  # column pass: key tiles up to the extent ...
    col_steps = cdiv(extent, col["BLOCK_M"] + col["BLOCK_M_FMA"])  # ... each visiting query steps up to it
    assert visited(padding, cells) == {
        "forward": H * query_tiles * int(key_tiles.sum()),
        "columns": H * int((col_tiles * col_steps).sum()),
    }
    full = visited(torch.zeros_like(padding), cells)
    assert full == {
        "forward": 4 * H * query_tiles * cdiv(L, fwd["BLOCK_N"]),
        "columns": 4 * H * cdiv(L, col["BLOCK_N"]) * cdiv(L, col["BLOCK_M"] + col["BLOCK_M_FMA"]),
    }
    # cells not counted get no column pass at all
    assert visited(padding, cells[2:3])["columns"] == H * int(col_tiles[2] * col_steps[2])


def test_exponential_on_the_fma_pipe():
    """exp2_fma (the column pass's share of exponentials off the exponential unit) is within 3e-7 of
    2**x relative, from the masked bias (-1e30) to x = 0 and slightly above (rounding of lse)."""
    specials = torch.tensor([-0.5, 0.5, 0.0, -1e30, -200.0, -125.0])
    x = torch.cat([torch.linspace(-124.9, 1.0, 4096 - specials.numel()), specials]).to(DEVICE)
    y = torch.empty_like(x)
    _apply_exp2_fma[(1,)](x, y, N=4096)
    expected = torch.exp2(x.double())
    normal = x > -125
    rel = (y.double()[normal] / expected[normal] - 1).abs().max().item()
    assert rel < 3e-7, rel
    assert (y[~normal] < 2.0**-124).all() and (y >= 0).all()  # no 0, but far below anything a sum sees


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bfloat16 needs a CUDA GPU (the interpreter gets it wrong)")
@pytest.mark.parametrize("L", [7, 130, 300])
def test_bfloat16_on_cuda(L):
    """bf16 inputs: scores, log-sum-exps and statistics are computed in fp32 from the same rounded inputs as
    the reference's (1e-5); P is rounded to bf16 before P @ V and the output to bf16, each costing at most
    2**-8 * max|v|: atol = 2**-7 * max|v|."""
    q, k, v, padding, groups, tokens = batch(L, 5, 2, L, 32, torch.bfloat16)
    spec = spec_for(4, L, window=min(L, 40), n_context=3)
    (out, sums), (out_ref, ref) = both(q, k, v, padding, groups, tokens, spec)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), out_ref.float(), atol=2**-7 * v.abs().max().item(), rtol=0)
    assert_sums_close(sums, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="a grid this large needs a CUDA GPU")
def test_more_than_65535_cells_times_heads():
    """Every launch is a 1-D grid (axis 0 takes 2**31 - 1 programs): B * H = 67,200 runs and is exact."""
    B, H, L, D = 4200, 16, 9, 16
    q, k, v, padding, groups, tokens = batch(1, B, H, L, D, FP16)
    groups = torch.arange(B, device=DEVICE) % 3 - 1
    spec = spec_for(2, L, window=4)
    (out, sums), (out_ref, ref) = both(q, k, v, padding, groups, tokens, spec)
    torch.testing.assert_close(out.float(), out_ref.float(), **out_tol(v))
    assert_sums_close(sums, ref, atol=1e-5, rtol=1e-5)


def test_launches_beyond_one_grid_are_refused():
    from attnprof.kernels.triton_forward import check_tensors

    x = torch.empty(2**20, 16, 4096, 16, device="meta")  # B * H * L = 2**36 rows
    with pytest.raises(ValueError, match="exceeds what one launch grid covers"):
        check_tensors(x, x, x)


@triton.jit
def _apply_exp2_fma(X, Y, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(Y + i, exp2_fma(tl.load(X + i)))


# ----------------------------------------------------------------------------- errors
@pytest.mark.skipif(not INTERPRET, reason="only the interpreter gets bfloat16 wrong")
def test_bfloat16_under_the_interpreter_raises():
    q, k, v, padding, groups, tokens = batch(1, 2, 1, 5, 16, torch.bfloat16)
    with pytest.raises(ValueError, match="computes bfloat16 wrongly"):
        attention_stats(q, k, v, spec=StatsSpec(n_groups=4), groups=groups, key_padding_mask=padding, backend="triton")
    with pytest.raises(ValueError, match="computes bfloat16 wrongly"):
        triton_forward(q, k, v, padding)


def test_scales_the_masking_cannot_cover_are_refused():
    """Padded keys score -2**100 before the scale: a scale outside [2**-60, 2**20] (after log2 e), zero or
    negative would leave them near real scores (or flip the max), so the triton backend refuses it."""
    q, k, v, padding, groups, tokens = batch(2, 2, 1, 5, 16)
    for scale in (0.0, -0.25, 1e-20, 1e7):
        with pytest.raises(ValueError, match=r"scales in \[2\*\*-60, 2\*\*20\], got"):
            triton_forward(q, k, v, padding, scale=scale)
    q, k, v, _, _, _ = batch(3, 2, 2, 70, 16)
    padding = torch.zeros(2, 70, dtype=torch.bool, device=DEVICE)
    padding[0, :40] = True  # rows see whole tiles of padded keys first; their scaled max is or is not
    padding[1, [3, 50, 69]] = True  # below the initial MASKED (-1e30) depending on the scale
    for scale in (1e-3, 0.25, 1.0, 3.0):  # covered: as SDPA
        # ieee: scores reach ~100 here, where tf32x3's 22-bit split costs 1.8e-5 (docs/gpu.md); this is about masking
        out, _ = triton_forward(q, k, v, padding, scale=scale, precision="ieee")
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=~padding[:, None, None, :], scale=scale)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(q=torch.randn(2, 2, 5, 16, dtype=torch.float64)), "one dtype of float32"),
        (dict(k=torch.randn(2, 2, 5, 16, dtype=FP16)), "one dtype of float32"),
        (dict(k=torch.randn(2, 2, 5, 16, device="meta")), "on one device"),
        (dict(q=torch.randn(2, 2, 5, 130), k=torch.randn(2, 2, 5, 130), v=torch.randn(2, 2, 5, 130)), "head dims"),
        (dict(v=torch.randn(2, 2, 4, 16)), "one shape"),
        (dict(padding=torch.zeros(2, 4, dtype=torch.bool)), "padding must be a bool"),
        (dict(padding=torch.zeros(2, 5)), "padding must be a bool"),
        (dict(padding=torch.ones(2, 5, dtype=torch.bool)), "no real token"),
    ],
)
def test_bad_input_is_named(change, message):
    args = dict(q=torch.randn(2, 2, 5, 16), k=torch.randn(2, 2, 5, 16), v=torch.randn(2, 2, 5, 16), padding=None)
    args.update(change)
    args = {name: x if x is None or x.is_meta else x.to(DEVICE) for name, x in args.items()}
    with pytest.raises(ValueError, match=message):
        triton_forward(**args)


def test_compiles_for_h100_and_cpu_tensors_need_the_interpreter():
    """In a fresh process without TRITON_INTERPRET: CPU tensors are refused with a clear error, and every
    kernel compiles for sm_90 (codegen the interpreter never runs, e.g. globals in kernels must be constexpr)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # silence triton 3.9's notice; fusion is its default
    run = subprocess.run(
        [sys.executable, "-c", "import test_triton as t; t.check_without_interpreter()"],
        cwd=Path(__file__).parent, env={**env, "PYTHONPATH": str(Path(__file__).parents[1])},  # tests/: helpers
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr


def check_without_interpreter(all_configs: bool = False):
    """Run by the test above in a fresh process; ``all_configs`` compiles every autotune config (slow)."""
    from attnprof.kernels import triton_common as kc
    from attnprof.kernels import triton_forward as kf
    from attnprof.kernels import triton_stats as ks

    sass_counts = _sass_counts()

    assert not kc.INTERPRET
    if not torch.cuda.is_available():
        x = torch.randn(1, 1, 3, 16)
        with pytest.raises(ValueError, match="set TRITON_INTERPRET=1 .* or use backend='torch'"):
            attention_stats(x, x, x, spec=StatsSpec(n_groups=1), groups=[0], backend="triton")
    for name in ("fp32", "fp16", "bf16"):
        # per kernel: its flag settings in use; the first config, and the first that runs exponentials on FMAs
        variants = {
            kf._forward_kernel: [dict(WITH_STATS=True, WRITE_LSE=False, COUNT_TILES=False),
                                 dict(WITH_STATS=False, WRITE_LSE=True, COUNT_TILES=True)],
            ks._columns_kernel: [dict(COUNT_TILES=False), dict(COUNT_TILES=True)],
            ks._entries_kernel: [dict(WINDOW=True), dict(WINDOW=False)],
        }  # fmt: skip
        for kernel, flag_sets in variants.items():
            configs = kernel.configs if all_configs else [kernel.configs[0]] + [
                c for c in kernel.configs if c.kwargs.get("BLOCK_M_FMA")][:1]  # fmt: skip
            for config in configs:
                for flags in flag_sets:
                    sass_counts.compile_for_h100(kernel, dict(config.kwargs, **flags), name, config.num_warps,
                                                 config.num_stages, real_launch=False)  # fmt: skip
    print("ok")


def _sass_counts():
    """benches/sass_counts.py as a module (it holds the sm_90 compile both checks use)."""
    import importlib.util

    path = Path(__file__).parents[2] / "benches" / "sass_counts.py"
    spec = importlib.util.spec_from_file_location("sass_counts", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_every_autotune_config_compiles_for_h100():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-c", "import test_triton as t; t.check_without_interpreter(all_configs=True)"],
        cwd=Path(__file__).parent, env={**env, "PYTHONPATH": str(Path(__file__).parents[1])},  # tests/: helpers
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr


def test_counted_instructions_of_the_main_loops(tmp_path):
    """benches/sass_counts.py (the README's counted cost) on the kernels compiled for an H100: kernel 1's
    statistics add no exponential per score to the flash loop (one per score, plus one rescale per row
    and tile), the column pass spends exactly one, 4/5 of them with 32 of 160 rows on the FMA pipe, and
    kernel 1's masking of padded keys sits in a block that tiles of real keys skip."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "counts.json"
    script = Path(__file__).parents[2] / "benches" / "sass_counts.py"
    run = subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    counts = json.loads(out.read_text())
    exps = {name: r["per_score"]["MUFU.EX2"] for name, r in counts.items()}
    flash, k1 = counts["flash forward (SDPA stand-in)"], counts["kernel 1"]
    assert exps["kernel 1"] == exps["flash forward (SDPA stand-in)"] == (128 + 4) / 128  # per thread: 128 scores, 4 rows
    assert exps["column pass"] == 1.0 and exps["column pass, 32 FMA rows"] == 128 / 160
    assert k1["masking_block_instructions"] > 0 and flash["masking_block_instructions"] > 0
    assert k1["per_score"]["instructions"] > flash["per_score"]["instructions"]  # the statistics are not free
