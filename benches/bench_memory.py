"""Peak memory against the number of cells: attnprof stays flat, keeping every map grows per cell.

A small Nicheformer (the sums do not depend on the cell count; full vocabulary, so gene sums are
full size) profiles a stream of generated cells; the peak resident memory of each run is recorded
(``VmHWM``, reset before the run). Full mode: 100, 1,000 and 10,000 cells (keep-every-map: 100 and
1,000 only, it would need about 8 GB at 10,000).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from attnprof import Profiler
from attnprof.singlecell.nicheformer import Nicheformer, NicheformerConfig

from bench_e2e import keep_every_map, peak_rss_mb

BATCH = 64


def cell_stream(n, L, V, seed=0):
    """n cells of random genes, generated batch by batch (nothing kept)."""
    g = torch.Generator().manual_seed(seed)
    for s in range(0, n, BATCH):
        b = min(BATCH, n - s)
        t = torch.randint(30, V, (b, L), generator=g)
        t[:, :3] = torch.tensor([4, 6, 7])
        yield t, np.arange(s, s + b) % 2


def run_attnprof(model, n):
    V = model.config.n_tokens + 5
    with Profiler(model, groups=["a", "b"], genes=V, window=64, n_context=3) as prof, torch.inference_mode():
        for t, labels in cell_stream(n, model.config.context_length, V):
            prof.set_batch(groups=labels, tokens=t)
            model(t)
    return prof.profile


def run_keep_every_map(model, n):
    V = model.config.n_tokens + 5
    tokens, labels = zip(*cell_stream(n, model.config.context_length, V))
    return keep_every_map(model, torch.cat(tokens), np.concatenate(labels), BATCH, trim=False)


def measure(approach: str, n: int) -> dict:
    """Peak RSS and time of one run in a fresh process, so no other run's memory is counted."""
    out = subprocess.run([sys.executable, __file__, approach, str(n)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("approach", ["attnprof", "keep every map"])
@pytest.mark.parametrize("scale", [0, 1, 2])
def test_peak_memory(benchmark, full, approach, scale):
    n = (100, 1_000, 10_000)[scale] if full else (20, 100, 300)[scale]
    if approach == "keep every map" and full and n > 1_000:
        pytest.skip("keeping every map of 10,000 cells needs about 8 GB")
    benchmark.group = f"memory: {approach}"
    result = benchmark.pedantic(measure, args=(approach, n), rounds=1, iterations=1)
    benchmark.extra_info.update(contender=f"{approach}, {n} cells", cells=n, peak_rss_mb=round(result["peak_mb"]),
                                run_s=round(result["seconds"], 2), baseline=scale == 0)  # fmt: skip


if __name__ == "__main__":  # one measured run: python bench_memory.py <approach> <cells>
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = Nicheformer(NicheformerConfig.small(n_tokens=20_340, context_length=128)).eval()
    run = run_attnprof if sys.argv[1] == "attnprof" else run_keep_every_map
    start = time.perf_counter()
    _, peak = peak_rss_mb(lambda: run(net, int(sys.argv[2])))
    print(json.dumps({"peak_mb": peak, "seconds": time.perf_counter() - start}))
