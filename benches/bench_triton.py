"""The triton backend's kernels vs. plain attention at Nicheformer scale (needs a CUDA GPU).

    pytest benches/bench_triton.py -s --benchmark-columns=median,iqr,rounds

B=8 cells, H=16 heads, L=1500 tokens, D=32, fp16, no padding (the most work).
Each bench also prints and records (``extra_info``) its median time over that
of ``scaled_dot_product_attention`` (flash, no mask: the fastest plain baseline),
timed the same way with ``triton.testing.do_bench``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    pytest.skip("the triton benches need a CUDA GPU", allow_module_level=True)

import triton.testing  # noqa: E402

from attnprof.kernels import StatsSpec, attention_stats  # noqa: E402
from attnprof.kernels.triton_forward import forward, key_bias  # noqa: E402
from attnprof.kernels.triton_stats import StatsKernels  # noqa: E402

pytestmark = pytest.mark.gpu
B, H, L, D = 8, 16, 1500, 32


@pytest.fixture(scope="module")
def data():
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.float16, generator=g) for _ in range(3))
    padding = torch.zeros(B, L, dtype=torch.bool, device="cuda")
    groups = torch.arange(B, device="cuda") % 2
    tokens = torch.randint(30, 20340, (B, L), device="cuda", generator=g)
    spec = StatsSpec(n_groups=2, window=64, vocab_size=20345, panel=tuple(range(30, 80)), n_context=3)
    return dict(q=q, k=k, v=v, padding=padding, groups=groups, tokens=tokens, spec=spec)


def sdpa(d):
    return lambda: F.scaled_dot_product_attention(d["q"], d["k"], d["v"])


def sdpa_masked(d):  # what nn.MultiheadAttention runs with a key padding mask
    mask = ~d["padding"][:, None, None, :]
    return lambda: F.scaled_dot_product_attention(d["q"], d["k"], d["v"], attn_mask=mask)


def kernel1(d):
    bias = key_bias(d["padding"])
    return lambda: forward(d["q"], d["k"], d["v"], bias, D**-0.5, want_pmax=True)


def kernels_1_and_2(d):
    """Kernel 1, the column kernel and the window kernel: all the O(L^2) work, no torch glue."""
    bias = key_bias(d["padding"])
    cells = torch.arange(B, device="cuda")
    order, seg = cells, torch.tensor([0, B // 2, B], device="cuda")  # not the real groups: same work
    W = d["spec"].window
    pos_sum, pos_sq = torch.zeros(2, 2, H, W, W, dtype=torch.float64, device="cuda")

    def run():
        _, lse2, _ = forward(d["q"], d["k"], d["v"], bias, D**-0.5, want_pmax=True)
        kern = StatsKernels(d["q"], d["k"], bias, lse2, D**-0.5)
        kern.columns(cells)
        kern.window(order, seg, pos_sum, pos_sq, W)

    return run


def backend(d):
    """The whole ``attention_stats(backend='triton')`` call: checks, kernels and the torch reductions."""
    kw = {name: d[name] for name in ("spec", "groups", "tokens")}
    return lambda: attention_stats(d["q"], d["k"], d["v"], key_padding_mask=d["padding"], backend="triton", **kw)


@pytest.mark.parametrize("make", [sdpa, sdpa_masked, kernel1, kernels_1_and_2, backend], ids=lambda f: f.__name__)
def test_bench(benchmark, data, make):
    fn = make(data)
    fn()  # autotune and compile outside the timing

    def synced():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=30, warmup_rounds=3)
    ms = triton.testing.do_bench(fn)
    ratio = ms / triton.testing.do_bench(sdpa(data))
    benchmark.extra_info.update(do_bench_ms=ms, vs_sdpa=ratio)
    print(f"\n{make.__name__}: {ms * 1e3:.0f} us, {ratio:.2f}x scaled_dot_product_attention")
