"""The precision policy for fp32 inputs (kernels/triton_options.py): every policy against `reference`.

The interpreter's tl.dot ignores input_precision (a numpy fp32 matmul), so the kernels emulate each
policy's operand rounding with bit operations there (kernels/triton_forward.py ``mma``): tf32x3 as
Triton splits it (hi = round-to-nearest tf32, lo = the rest, truncated by the tensor core; three
products), tf32 by the tensor core's truncation to 10 mantissa bits, bf16/fp16 by round to nearest
even. These tests check that the rounding path runs (results differ from ``ieee``) and what it costs:

- ``tf32x3`` and ``ieee`` meet the contract (1e-5 on outputs and every statistic as a mean);
- ``tf32``, ``bf16``, ``fp16`` do not (so they are off by default): their statistics equal the
  reference computed on the same rounded inputs within the contract (the kernels add no error of
  their own), and their distance to the fp32 reference is bounded by the measured figures below
  (docs/gpu.md states them).
"""

from __future__ import annotations

import pytest
import torch

from attnprof.kernels.triton_forward import triton_forward
from attnprof.kernels.triton_options import (
    DEFAULT_PRECISION,
    EXACT_PRECISIONS,
    PRECISIONS,
    dot_precision,
    resolve,
    triton_options,
)

from helpers import as_means, assert_sums_close, spec_for
from test_triton import FP16, batch, both
from test_triton import pytestmark  # noqa: F401

ROUNDING = ("tf32", "bf16", "fp16")
# measured on this batch (fp32 q, k, v ~ N(0, 1.5^2), D 32; see docs/gpu.md): max |error| of the output
# and of any statistic as a mean, against the fp32 reference. The bounds are ~2x the measurement.
BOUNDS = {"tf32": (1e-2, 1.5e-2), "bf16": (5e-2, 2e-2), "fp16": (1e-2, 1e-2)}


def _truncate_tf32(x):
    return (x.contiguous().view(torch.int32) & -8192).view(torch.float32)


ROUND_INPUTS = {
    "tf32": _truncate_tf32,
    "bf16": lambda x: x.bfloat16().float(),
    "fp16": lambda x: x.half().float(),
}


def ragged():
    B, H, L, D = 5, 2, 70, 32
    q, k, v, padding, groups, tokens = batch(70, B, H, L, D)
    return q, k, v, padding, groups, tokens, spec_for(4, L, window=20, n_context=3)


def max_errors(sums, ref):
    ma, mr = as_means(sums), as_means(ref)
    return {n: (ma[n] - mr[n]).abs().max().item() for n in mr if not (n.endswith("count") or n == "cells")}


@pytest.mark.parametrize("precision", EXACT_PRECISIONS)
def test_exact_policies_meet_the_contract(precision, capsys):
    q, k, v, padding, groups, tokens, spec = ragged()
    with triton_options(precision=precision):
        (out, sums), (out_ref, ref) = both(q, k, v, padding, groups, tokens, spec)
    errors = max_errors(sums, ref)
    with capsys.disabled():
        print(f"\n{precision}: output {(out - out_ref).abs().max().item():.2e}, statistics {max(errors.values()):.2e} "
              f"({max(errors, key=errors.get)})")  # fmt: skip
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    assert_sums_close(sums, ref, atol=1e-5, rtol=1e-5)


def test_tf32x3_runs_its_split_not_ieee():
    """The default's emulated split changes the last bits (so the tests above ran it), and nothing more."""
    q, k, v, padding, *_ = ragged()
    out3, lse3 = triton_forward(q, k, v, padding, precision="tf32x3")
    out1, lse1 = triton_forward(q, k, v, padding, precision="ieee")
    assert not torch.equal(out3, out1) and not torch.equal(lse3, lse1)
    torch.testing.assert_close(out3, out1, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("precision", ROUNDING)
def test_rounding_policies_equal_the_reference_on_rounded_inputs(precision):
    """Statistics within the contract of the reference on the inputs rounded as the policy rounds them;
    the output also rounds P before P @ V, as for 16-bit models (atol 2**-10 max|v| as for fp16;
    2**-7 for bf16's 8 bits)."""
    q, k, v, padding, groups, tokens, spec = ragged()
    r = ROUND_INPUTS[precision]
    with triton_options(precision=precision):
        (out, sums), _ = both(q, k, v, padding, groups, tokens, spec)
    _, (out_ref, ref) = both(r(q), r(k), r(v), padding, groups, tokens, spec)  # the reference's, on rounded inputs
    assert_sums_close(sums, ref, atol=1e-5, rtol=1e-5)
    bits = 7 if precision == "bf16" else 10
    torch.testing.assert_close(out, out_ref, atol=2**-bits * v.abs().max().item(), rtol=0)


@pytest.mark.parametrize("precision", ROUNDING)
def test_rounding_policies_miss_the_contract_by_the_measured_error(precision, capsys):
    q, k, v, padding, groups, tokens, spec = ragged()
    with triton_options(precision=precision):
        (out, sums), (out_ref, ref) = both(q, k, v, padding, groups, tokens, spec)
    errors = max_errors(sums, ref)
    out_err, stat_err = (out - out_ref).abs().max().item(), max(errors.values())
    with capsys.disabled():
        print(f"\n{precision}: output {out_err:.2e}, statistics {stat_err:.2e} ({max(errors, key=errors.get)})")
    assert stat_err > 1e-5  # outside the contract: the reason it is not the default
    assert out_err < BOUNDS[precision][0] and stat_err < BOUNDS[precision][1]


def test_16_bit_inputs_ignore_the_policy():
    q, k, v, padding, *_ = batch(7, 3, 2, 40, 16, FP16)
    assert dot_precision(FP16, "bf16") == dot_precision(torch.bfloat16, "tf32") == "native"
    out_a, lse_a = triton_forward(q, k, v, padding, precision="bf16")
    out_b, lse_b = triton_forward(q, k, v, padding, precision="ieee")
    assert torch.equal(out_a, out_b) and torch.equal(lse_a, lse_b)


def test_where_the_options_come_from(monkeypatch):
    monkeypatch.delenv("ATTNPROF_PRECISION", raising=False)
    monkeypatch.delenv("ATTNPROF_DETERMINISTIC", raising=False)
    assert resolve() == resolve(DEFAULT_PRECISION, False) and DEFAULT_PRECISION == "tf32x3"
    monkeypatch.setenv("ATTNPROF_PRECISION", "tf32")
    monkeypatch.setenv("ATTNPROF_DETERMINISTIC", "1")
    assert (resolve().precision, resolve().deterministic) == ("tf32", True)
    with triton_options(precision="bf16", deterministic=False):
        assert (resolve().precision, resolve().deterministic) == ("bf16", False)
        with triton_options(precision="ieee"):
            assert (resolve().precision, resolve().deterministic) == ("ieee", False)
        assert resolve("fp16").precision == "fp16"  # an explicit argument wins
    assert resolve().precision == "tf32"
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        resolve("fp8")
    with pytest.raises(ValueError, match="unknown precision"), triton_options(precision="tf64"):
        pass
    assert set(PRECISIONS) == {"tf32x3", "fp16x3", "tf32", "bf16", "fp16", "ieee"}


def test_fp16x3_outside_fp16_range_is_reported_not_wrong():
    """fp16x3 needs |q|, |k|, |v| < 65504: a larger entry overflows its fp16 half and the call is refused
    as non-finite (the reference and tf32x3 take it)."""
    from attnprof.kernels import attention_stats

    q, k, v, padding, groups, tokens, spec = ragged()
    q = q.clone()
    q[0, 0, 0, 0] = 1e5
    kw = dict(spec=spec, groups=groups, key_padding_mask=padding, tokens=tokens, backend="triton")
    with triton_options(precision="fp16x3"), pytest.raises(ValueError, match="overflowed|NaN or Inf"):
        attention_stats(q, k, v, **kw)
    with triton_options(precision="tf32x3"):
        attention_stats(q, k, v, **kw)
