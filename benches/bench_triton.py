"""The triton backend vs. plain attention on a CUDA GPU (skips elsewhere).

    pytest benches/bench_triton.py -s --benchmark-columns=median,iqr,rounds

Two shapes, fp16, H=16, D=32: ``full`` (B=8 cells of L=1500 real tokens, the most work) and
``panel`` (B=32 cells of 150-250 real tokens, padded to the longest, as MERFISH batches are).
Contenders, each timed with ``triton.testing.do_bench`` (median) in the same session and
divided by flash ``scaled_dot_product_attention`` (no mask: the fastest plain baseline):

- ``sdpa``, ``sdpa_masked``: plain attention, without and with the key padding mask;
- ``kernel1``: the forward with its row statistics;
- ``kernels_1_and_2``: kernel 1, the column pass, the window and the panel entries;
- ``layer_call``: the whole profiled layer call on a prebuilt plan (kernels, reductions into
  the run's sums in place);

plus an end-to-end Nicheformer forward (12 layers, d_model 512, fp16) profiled vs plain.
Every ratio is written to ``benches/results/triton.json`` (with the GPU's name).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    pytest.skip("the triton benches need a CUDA GPU", allow_module_level=True)

import triton.testing  # noqa: E402

import attnprof  # noqa: E402
from attnprof.kernels import Target, planned_stats  # noqa: E402
from attnprof.kernels.triton_forward import extents, forward, key_bias  # noqa: E402
from attnprof.kernels.triton_stats import cell_results  # noqa: E402

import gpu_check  # noqa: E402  (benches/ is on the path: its conftest.py)

pytestmark = pytest.mark.gpu
H, D = 16, 32
SHAPES = {"full": (8, 1500, 1500, 1500), "panel": (32, 250, 150, 250)}  # B, L, shortest, longest
RESULTS = Path(__file__).parent / "results" / "triton.json"


@pytest.fixture(scope="module")
def record():
    rows = {}
    yield rows
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "vs_sdpa": rows}, indent=2))


@pytest.fixture(scope="module", params=list(SHAPES))
def data(request):
    return workload(request.param)


def workload(name: str, device="cuda", dtype=torch.float16, shapes=SHAPES) -> dict:
    """The inputs and plan of one shape (gpu_check.py's, with H heads of dim D)."""
    made = gpu_check.workload(shapes[name], D, dtype, device=device, width=H * D)
    return dict(name=name, **{key: made[key] for key in ("q", "k", "v", "padding", "groups", "tokens", "spec", "plan")})


def sdpa(d):
    return lambda: F.scaled_dot_product_attention(d["q"], d["k"], d["v"])


def sdpa_masked(d):  # what nn.MultiheadAttention runs with a key padding mask
    mask = ~d["padding"][:, None, None, :]
    return lambda: F.scaled_dot_product_attention(d["q"], d["k"], d["v"], attn_mask=mask)


def _facts(d):
    real = ~d["padding"]
    return dict(bias=key_bias(d["padding"]), extent=extents(d["padding"]), inv_n=real.sum(1).float().reciprocal())


def kernel1(d):
    f = _facts(d)
    return lambda: forward(d["q"], d["k"], d["v"], f["bias"], f["extent"], D**-0.5, inv_n=f["inv_n"], n_context=3)


def kernels_1_and_2(d):
    """Kernel 1, the column pass and the window and panel entries: all the O(L^2) work."""
    f, plan = _facts(d), d["plan"]
    kw = dict(cells=plan.counted, window=plan.window, n_context=3, panel_pos=plan.panel_pos)
    return lambda: cell_results(d["q"], d["k"], d["v"], D**-0.5, **f, **kw)


def layer_call(d):
    """One profiled layer's whole call on the forward's plan, adding into the run's sums in place."""
    plan = d["plan"]
    sums = attnprof.kernels.empty_sums(d["spec"], H, device=d["q"].device)
    targets = [Target({name: x[None] for name, x in sums.items()}, slice(0, 1))]
    q, k, v = d["q"], d["k"], d["v"]
    return lambda: planned_stats(q, k, v, plan, targets, backend="triton")


def _time(benchmark, fn):
    fn()  # autotune and compile outside the timing

    def synced():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=20, warmup_rounds=3)
    return triton.testing.do_bench(fn)


@pytest.mark.parametrize("make", [sdpa, sdpa_masked, kernel1, kernels_1_and_2, layer_call], ids=lambda f: f.__name__)
def test_bench(benchmark, data, make, record):
    benchmark.group = f"triton {data['name']}"
    ms = _time(benchmark, make(data))
    ratio = ms / triton.testing.do_bench(sdpa(data))
    benchmark.extra_info.update(contender=make.__name__, do_bench_ms=ms, vs_sdpa=ratio)
    record[f"{data['name']}/{make.__name__}"] = {"ms": ms, "vs_sdpa": ratio}
    print(f"\n{data['name']} {make.__name__}: {ms * 1e3:.0f} us, {ratio:.2f}x scaled_dot_product_attention")


def test_nicheformer_forward_profiled_vs_plain(benchmark, record):
    """A 12-layer Nicheformer forward in fp16 on 8 full-length cells: profiled (triton, W = 64, gene
    statistics) over plain inference (the fused fast path or the regular one, whichever is faster)."""
    from attnprof.adapters.mha import fastpath_disabled
    from attnprof.singlecell.nicheformer import Nicheformer, NicheformerConfig

    torch.manual_seed(0)
    config = NicheformerConfig()
    model = Nicheformer(config).eval().to("cuda", torch.float16)
    B, L, V = 8, config.context_length, config.n_tokens + 5
    tokens = torch.randint(30, V, (B, L), device="cuda")
    tokens[:, :3] = torch.tensor([4, 6, 7], device="cuda")
    labels = [i % 2 for i in range(B)]

    def plain_fast():
        with torch.inference_mode():
            model(tokens)

    def plain_regular():
        with torch.inference_mode(), fastpath_disabled():
            model(tokens)

    prof = attnprof.Profiler(model, groups=["a", "b"], genes=V, window=64, n_context=3, backend="triton")

    def profiled():
        prof.set_batch(groups=labels, tokens=tokens)
        with torch.inference_mode():
            model(tokens)

    plain_ms = min(triton.testing.do_bench(f) for f in (plain_fast, plain_regular))
    with prof:
        ms = _time(benchmark, profiled)
    benchmark.group = "triton nicheformer"
    benchmark.extra_info.update(contender="profiled forward", do_bench_ms=ms, vs_plain=ms / plain_ms)
    record["nicheformer/profiled_vs_plain"] = {"ms": ms, "plain_ms": plain_ms, "ratio": ms / plain_ms}
    print(f"\nnicheformer forward: profiled {ms:.2f} ms, plain {plain_ms:.2f} ms, {ms / plain_ms:.2f}x")
