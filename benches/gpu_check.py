"""The triton backend timed on a CUDA GPU: fp16, bf16 and fp32 models, head dims 32 and 64, full and panel
cells; kernels and the profiled layer call against flash SDPA, and a 12-layer encoder forward profiled
vs plain. Writes every number to ``benches/results/gpu.json`` (after each measurement, so a run cut
short keeps what it had). Run by ``benches/gpu_check.sh``; alone:

    python benches/gpu_check.py                     # everything (~5-8 minutes on an H100)
    python benches/gpu_check.py --quick             # smaller shapes, for a smoke run
    python benches/gpu_check.py --dry-run           # print the plan and exit (no GPU needed)

Shapes (H = 512 / D heads, the width of Nicheformer and Geneformer): ``full`` B=8 cells of 1,500 real
tokens; ``panel`` B=32 cells of 150-250 real tokens padded to 250. fp32 inputs run under the
precision policy given by ``--precision`` (default tf32x3, see kernels/triton_options.py); plain fp32
SDPA runs as torch runs it (no TF32 unless ``torch.backends.cuda.matmul.allow_tf32``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DTYPES = ("fp16", "bf16", "fp32")
SHAPES = {"full": (8, 1500, 1500, 1500), "panel": (32, 250, 150, 250)}  # B, L, shortest, longest
QUICK = {"full": (2, 512, 512, 512), "panel": (8, 128, 60, 128)}
CONTENDERS = ("sdpa", "sdpa_masked", "kernel1", "kernels_1_and_2", "layer_call", "layer_call_deterministic")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gpu.json")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated subset of fp16,bf16,fp32")
    p.add_argument("--head-dims", default="32,64", help="comma-separated head dims (32, 64, 128)")
    p.add_argument("--shapes", default="full,panel", help="comma-separated subset of full,panel")
    p.add_argument("--precision", default="tf32x3", help="policy for fp32 inputs: tf32x3, tf32, bf16, fp16, ieee")
    p.add_argument("--layers", type=int, default=12, help="layers of the end-to-end encoder forward (0: skip it)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds; later measurements are skipped past it")
    p.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit without touching a GPU")
    a = p.parse_args(argv)
    a.dtypes = [d for d in a.dtypes.split(",") if d]
    a.head_dims = [int(d) for d in a.head_dims.split(",") if d]
    a.shapes = [s for s in a.shapes.split(",") if s]
    bad = [d for d in a.dtypes if d not in DTYPES] + [s for s in a.shapes if s not in SHAPES]
    bad += [str(d) for d in a.head_dims if d not in (32, 64, 128)]
    from attnprof.kernels.triton_options import PRECISIONS

    if bad or a.precision not in PRECISIONS:
        p.error(f"unknown values: {bad or [a.precision]}")
    return a


def plan(a) -> list[tuple]:
    """Every measurement, in order: (dtype, head dim, shape, contender)."""
    work = [(dt, d, s, c) for dt in a.dtypes for d in a.head_dims for s in a.shapes for c in CONTENDERS]
    if a.layers:
        work += [(dt, d, s, "encoder") for dt in a.dtypes for d in a.head_dims for s in a.shapes]
    return work


def main(argv=None) -> int:
    a = parse(argv)
    todo = plan(a)
    if a.dry_run:
        print(f"{len(todo)} measurements -> {a.out}")
        for row in todo:
            print("  ", *row)
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_check needs a CUDA GPU (use --dry-run to see the plan)", file=sys.stderr)
        return 2
    return run(a, todo)


def run(a, todo) -> int:
    import torch
    import triton
    import triton.testing

    from attnprof.kernels.triton_options import triton_options

    shapes = QUICK if a.quick else SHAPES
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "precision_fp32": a.precision, "quick": a.quick, "results": {}, "skipped": []}  # fmt: skip
    a.out.parent.mkdir(parents=True, exist_ok=True)
    start, cache = time.time(), {}
    for dtype, D, shape, what in todo:
        name = f"{dtype}/D{D}/{shape}/{what}"
        if time.time() - start > a.budget:
            results["skipped"].append(name)
            continue
        key = (dtype, D, shape)
        if key not in cache:
            cache.clear()
            torch.cuda.empty_cache()
            cache[key] = workload(shapes[shape], D, getattr(torch, {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[dtype]))
        d = cache[key]
        try:
            with triton_options(precision=a.precision):
                if what == "encoder":
                    row = encoder(d, a.layers)
                else:
                    fn = make(what, d)
                    fn()  # compile and autotune outside the timing
                    ms = triton.testing.do_bench(fn)
                    row = {"ms": ms, "vs_sdpa": ms / d.setdefault("sdpa_ms", triton.testing.do_bench(make("sdpa", d)))}
        except Exception as e:  # noqa: BLE001 -- record and go on: one failure must not lose the rest
            row = {"error": f"{type(e).__name__}: {e}"[:500]}
        results["results"][name] = row
        print(name, json.dumps(row), flush=True)
        a.out.write_text(json.dumps(results, indent=1) + "\n")
    results["seconds"] = time.time() - start
    a.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"written to {a.out}")
    return 1 if any("error" in r for r in results["results"].values()) else 0


def workload(shape, D, dtype, device="cuda", width=512) -> dict:
    """Inputs and plan of one shape (B, L, shortest, longest): H = width / D heads."""
    import torch

    from attnprof.kernels import StatsSpec, build_plan

    B, L, lo, hi = shape
    H = width // D
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, device=device, dtype=dtype, generator=g) for _ in range(3))
    lengths = torch.randint(lo, hi + 1, (B,), device=device, generator=g)
    lengths[0] = hi
    padding = torch.arange(L, device=device) >= lengths[:, None]
    groups = torch.arange(B, device=device) % 2
    tokens = torch.randint(80, 20340, (B, L), device=device, generator=g)
    tokens[:, 3:53] = torch.arange(30, 80, device=device)  # every panel gene in every cell
    spec = StatsSpec(n_groups=2, window=64, vocab_size=20345, panel=tuple(range(30, 80)), n_context=3)
    return dict(q=q, k=k, v=v, padding=padding, groups=groups, tokens=tokens, spec=spec, H=H, D=D, B=B, L=L,
                plan=build_plan(spec, groups, padding, tokens))  # fmt: skip


def make(what: str, d: dict):
    import torch
    import torch.nn.functional as F

    from attnprof.kernels import Target, empty_sums, planned_stats
    from attnprof.kernels.triton_forward import extents, forward, key_bias
    from attnprof.kernels.triton_options import triton_options
    from attnprof.kernels.triton_stats import cell_results

    q, k, v, plan, D = d["q"], d["k"], d["v"], d["plan"], d["D"]
    facts = dict(bias=key_bias(d["padding"]), extent=extents(d["padding"]), inv_n=(~d["padding"]).sum(1).float().reciprocal())
    if what == "sdpa":
        return lambda: F.scaled_dot_product_attention(q, k, v)
    if what == "sdpa_masked":
        mask = ~d["padding"][:, None, None, :]
        return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if what == "kernel1":
        return lambda: forward(q, k, v, facts["bias"], facts["extent"], D**-0.5, inv_n=facts["inv_n"], n_context=3)
    if what == "kernels_1_and_2":
        kw = dict(cells=plan.counted, window=plan.window, n_context=3, panel_pos=plan.panel_pos)
        return lambda: cell_results(q, k, v, D**-0.5, **facts, **kw)
    sums = empty_sums(d["spec"], d["H"], device=q.device)
    targets = [Target({name: x[None] for name, x in sums.items()}, slice(0, 1))]
    if what == "layer_call":
        return lambda: planned_stats(q, k, v, plan, targets, backend="triton")

    def deterministic():
        with triton_options(deterministic=True):
            planned_stats(q, k, v, plan, targets, backend="triton")

    assert what == "layer_call_deterministic" and torch
    return deterministic


def encoder(d: dict, n_layers: int) -> dict:
    """A ``n_layers`` nn.TransformerEncoder (d_model 512, H heads of D) on the workload's cells: profiled
    (triton, W 64, gene statistics, a 50-gene panel) over plain inference (the faster of the fused
    fast path and the regular one)."""
    import torch
    import triton.testing
    from torch import nn

    import attnprof
    from attnprof.adapters.mha import fastpath_disabled

    torch.manual_seed(0)
    dtype = d["q"].dtype
    layer = nn.TransformerEncoderLayer(512, d["H"], 2048, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False).eval().to("cuda", dtype)
    x = torch.randn(d["B"], d["L"], 512, device="cuda", dtype=dtype)
    mask = d["padding"]

    def plain_fast():
        with torch.inference_mode():
            model(x, src_key_padding_mask=mask)

    def plain_regular():
        with torch.inference_mode(), fastpath_disabled():
            model(x, src_key_padding_mask=mask)

    prof = attnprof.Profiler(model, groups=["a", "b"], genes=20345, window=64, n_context=3,
                             panel=list(range(30, 80)), backend="triton")  # fmt: skip
    labels = [i % 2 for i in range(d["B"])]

    def profiled():
        prof.set_batch(groups=labels, tokens=d["tokens"])
        with torch.inference_mode():
            model(x, src_key_padding_mask=mask)

    plain_ms = min(triton.testing.do_bench(f) for f in (plain_fast, plain_regular))
    with prof:
        profiled()
        ms = triton.testing.do_bench(profiled)
    return {"ms": ms, "plain_ms": plain_ms, "vs_plain": ms / plain_ms}


if __name__ == "__main__":
    sys.exit(main())
