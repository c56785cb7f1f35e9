"""The torch backend equals the reference on the output and every statistic."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from attnprof.kernels import StatsSpec, attention_stats, sum_shapes
from attnprof.kernels.blocked import blocked_stats
from attnprof.kernels.reference import attention_probs, stats_from_probs
from attnprof.kernels.spec import check_inputs

from helpers import assert_sums_close, random_batch, skip_unless_built, spec_for


def run(backend, q, k, v, padding, groups, tokens, spec):
    return attention_stats(q, k, v, spec=spec, groups=groups, key_padding_mask=padding, tokens=tokens, backend=backend)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 6),
    H=st.integers(1, 4),
    L=st.integers(1, 300),
    D=st.integers(8, 64),
    G=st.integers(1, 4),
    window=st.integers(1, 80),
    n_context=st.integers(0, 4),
    trailing=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
@example(B=6, H=4, L=300, D=64, G=4, window=80, n_context=3, trailing=False, seed=1)
@example(B=5, H=3, L=257, D=8, G=1, window=64, n_context=0, trailing=True, seed=2)
@example(B=2, H=2, L=129, D=33, G=3, window=1, n_context=4, trailing=False, seed=3)
def test_torch_equals_reference(B, H, L, D, G, window, n_context, trailing, seed):
    q, k, v, padding, groups, tokens = random_batch(seed, B, H, L, D, G, trailing=trailing)
    spec = spec_for(G, L, window=window, n_context=n_context)
    out_ref, ref = run("reference", q, k, v, padding, groups, tokens, spec)
    out, fast = run("torch", q, k, v, padding, groups, tokens, spec)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    assert_sums_close(fast, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("L", [1, 7, 64, 65, 257])
@pytest.mark.parametrize("block_elems", [1, 97, 4096])
def test_eager_row_blocks_of_any_size(L, block_elems, monkeypatch):
    """The eager fallback of the fused row pass: blocks of 1 row, of a prime number of elements,
    and larger than the cell give the reference's output and sums."""
    monkeypatch.setenv("ATTNPROF_FUSED", "0")
    q, k, v, padding, groups, tokens = random_batch(L, 4, 3, L, 16, 2)
    spec = spec_for(2, L, window=min(L, 9))
    inp = check_inputs(q, k, v, padding, groups, tokens, spec, None)
    out_ref, ref = run("reference", q, k, v, padding, groups, tokens, spec)
    out, fast = blocked_stats(inp, spec, block_elems=block_elems)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    assert_sums_close(fast, ref)


@pytest.mark.parametrize("shape", [(3, 2, 37, 8), (2, 4, 130, 33), (2, 16, 300, 32)])
def test_fused_row_pass_equals_reference(shape, monkeypatch):
    """The compiled row pass (forced on for every cell size) inside the torch backend."""
    from attnprof.kernels import blocked, fused_rows

    skip_unless_built(fused_rows.available(), "the fused CPU kernel cannot be built here (the eager path is tested above)")
    monkeypatch.setattr(blocked, "FUSED_MIN_SCORES", 0)
    B, H, L, D = shape
    q, k, v, padding, groups, tokens = random_batch(L, B, H, L, D, 2)
    spec = spec_for(2, L, window=min(L, 40))
    out_ref, ref = run("reference", q, k, v, padding, groups, tokens, spec)
    out, fast = run("torch", q, k, v, padding, groups, tokens, spec)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    assert_sums_close(fast, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    """fp16/bf16 inputs: both backends compute in fp32 from the same rounded inputs, so the
    statistics agree to fp32 accuracy (1e-5); the output is rounded to the input dtype, so it
    agrees to one unit in its last place (fp16 1e-3, bf16 8e-3 relative)."""
    q, k, v, padding, groups, tokens = random_batch(3, 5, 4, 70, 32, 3, dtype=dtype)
    spec = spec_for(3, 70, window=16)
    out_ref, ref = run("reference", q, k, v, padding, groups, tokens, spec)
    out, fast = run("torch", q, k, v, padding, groups, tokens, spec)
    assert out.dtype == dtype
    tol = {torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(out.float(), out_ref.float(), atol=tol, rtol=tol)
    assert_sums_close(fast, ref, atol=1e-5, rtol=1e-5)
    # and the statistics track the fp32 computation to the input rounding
    _, exact = run("reference", q.float(), k.float(), v.float(), padding, groups, tokens, spec)
    assert_sums_close(fast, exact, atol=5e-2, rtol=5e-2)


def test_output_is_sdpa_with_key_padding():
    q, k, v, padding, groups, tokens = random_batch(7, 4, 2, 33, 8, 2)
    spec = spec_for(2, 33)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=~padding[:, None, None, :])
    for backend in ("reference", "torch"):
        out, _ = run(backend, q, k, v, padding, groups, tokens, spec)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_reference_on_a_hand_computed_cell():
    """One cell, one head, L=3 with the last key padded: every statistic by hand."""
    # q_i = e_i and k_j = column j of the score matrix S, so that q_i . k_j = S[i, j]
    q = torch.eye(3)[None, None]
    log3 = math.log(3.0)
    k = torch.tensor([[0.0, log3, 0.0], [log3, 0.0, 0.0], [0.0, 0.0, 0.0]])[None, None]
    v = torch.randn(1, 1, 3, 3)
    padding = torch.tensor([[False, False, True]])
    spec = StatsSpec(n_groups=1, window=3, vocab_size=5, panel=(2, 4), n_context=1)
    tokens = torch.tensor([[2, 4, 0]])
    _, sums = attention_stats(
        q, k, v, spec=spec, groups=[0], key_padding_mask=padding, tokens=tokens, scale=1.0, backend="reference"
    )
    # row 0 scores keys (0, 1) = (0, log 3) -> P = (1/4, 3/4); row 1 scores (log 3, 0) -> (3/4, 1/4)
    P = torch.tensor([[0.25, 0.75], [0.75, 0.25]], dtype=torch.float64)
    assert sums["cells"].tolist() == [1.0]
    torch.testing.assert_close(sums["pos_sum"][0, 0, :2, :2], P)
    assert sums["pos_count"][0].tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 0]]
    entropy = -(P * P.log()).sum(1).mean()
    expected_summary = torch.stack([entropy, P[:, 0].mean(), P.diagonal().mean(), P.max(1).values.mean()])
    torch.testing.assert_close(sums["summary_sum"][0, 0], expected_summary)
    torch.testing.assert_close(sums["recv_sum"][0, 0, [2, 4]], P.mean(0))  # token 2 at key 0, token 4 at key 1
    assert sums["recv_count"][0].tolist() == [0, 0, 1, 0, 1]  # padded token 0 is not counted
    torch.testing.assert_close(sums["pair_sum"][0, 0], P)  # panel (2, 4) sits at positions (0, 1)


def test_repeated_tokens_sum_within_a_cell_and_count_once():
    q, k, v, padding, groups, _ = random_batch(11, 1, 2, 6, 8, 1)
    padding[:] = False
    groups[:] = 0
    tokens = torch.tensor([[3, 3, 1, 3, 2, 1]])
    spec = StatsSpec(n_groups=1, window=2, vocab_size=4, panel=(3, 1))
    for backend in ("reference", "torch"):
        _, sums = run(backend, q, k, v, padding, groups, tokens, spec)
        P = attention_probs(check_inputs(q, k, v, padding, groups, tokens, spec, None))[0].double()
        received = P.mean(1)  # [H, L]
        torch.testing.assert_close(sums["recv_sum"][0, :, 3], received[:, [0, 1, 3]].sum(-1))
        assert sums["recv_count"][0].tolist() == [0, 1, 1, 1]
        # pair (3 -> 1): mean over the three query rows of token 3 of the mass on both keys of token 1
        expected = P[:, [0, 1, 3]][:, :, [2, 5]].sum(-1).mean(-1)
        torch.testing.assert_close(sums["pair_sum"][0, :, 0, 1], expected)


def test_cells_not_counted_and_empty_groups():
    q, k, v, padding, _, tokens = random_batch(5, 4, 2, 20, 8, 3)
    groups = torch.tensor([-1, 0, 0, -1])
    spec = spec_for(3, 20)
    for backend in ("reference", "torch"):
        _, sums = run(backend, q, k, v, padding, groups, tokens, spec)
        assert sums["cells"].tolist() == [2, 0, 0]
        for name, value in sums.items():
            assert value[1:].abs().sum() == 0, f"{name} has mass in an empty group"
            assert value.shape == sum_shapes(spec, 2)[name]


def test_stats_from_probs_matches_reference_backend():
    q, k, v, padding, groups, tokens = random_batch(9, 3, 2, 17, 8, 2)
    spec = spec_for(2, 17)
    inp = check_inputs(q, k, v, padding, groups, tokens, spec, None)
    _, ref = run("reference", q, k, v, padding, groups, tokens, spec)
    assert_sums_close(stats_from_probs(attention_probs(inp), padding, groups, tokens, spec), ref, atol=0, rtol=0)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(groups=torch.tensor([0, 2])), "out of range"),
        (dict(groups=torch.tensor([0, 1, 0])), "mismatched batch sizes"),
        (dict(groups=torch.tensor([0.0, 1.0])), "integer codes"),
        (dict(tokens=torch.full((2, 5), 99)), "outside the vocabulary"),
        (dict(tokens=None), "pass tokens"),
        (dict(tokens=torch.zeros(2, 4, dtype=torch.long)), "tokens must have shape"),
        (dict(key_padding_mask=torch.ones(2, 5, dtype=torch.bool)), "no real token"),
        (dict(key_padding_mask=torch.zeros(2, 5)), "must be bool"),
        (dict(k=torch.randn(2, 2, 6, 4)), "same shape"),
        (dict(q=torch.randn(2, 5, 4)), "shape [B, H, L, D]"),
        (dict(backend="cuda-magic"), "unknown backend"),
    ],
)
def test_bad_input_is_named(change, message):
    B, H, L, D = 2, 2, 5, 4
    args = dict(
        q=torch.randn(B, H, L, D),
        k=torch.randn(B, H, L, D),
        v=torch.randn(B, H, L, D),
        groups=torch.tensor([0, 1]),
        tokens=torch.zeros(B, L, dtype=torch.long),
        key_padding_mask=None,
        backend="torch",
        spec=StatsSpec(n_groups=2, window=4, vocab_size=6),
    )
    args.update(change)
    if "v" not in change and args["k"].shape != args["q"].shape:
        args["v"] = args["k"]
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        attention_stats(**args)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_groups=0), "n_groups"),
        (dict(n_groups=1, window=0), "window"),
        (dict(n_groups=1, vocab_size=5, panel=(1, 1)), "unique"),
        (dict(n_groups=1, vocab_size=5, panel=(7,)), "outside the vocabulary"),
        (dict(n_groups=1, panel=(1,)), "needs vocab_size"),
    ],
)
def test_bad_spec_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StatsSpec(**kwargs)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_into_adds_to_running_sums(backend):
    q, k, v, padding, groups, tokens = random_batch(4, 3, 2, 19, 8, 2)
    spec = spec_for(2, 19)
    _, once = run(backend, q, k, v, padding, groups, tokens, spec)
    running = {name: value.clone() for name, value in once.items()}
    _, total = attention_stats(q, k, v, spec=spec, groups=groups, key_padding_mask=padding, tokens=tokens,
                               backend=backend, into=running)  # fmt: skip
    assert total is running
    for name in once:
        torch.testing.assert_close(total[name], 2 * once[name], msg=name)
    with pytest.raises(ValueError, match="into= must hold float64 sums"):
        attention_stats(q, k, v, spec=spec, groups=groups, key_padding_mask=padding, tokens=tokens,
                        backend=backend, into={"cells": torch.zeros(2)})  # fmt: skip
