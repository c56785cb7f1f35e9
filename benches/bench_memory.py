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


def run_permutations(model, n, permutations):
    """Panel-length cells (150-250 tokens of a 300-gene panel) of 8 animals in batches of 32, sums per animal,
    then the comparison with ``permutations`` relabelings of whole animals (computed from the block sums)."""
    V, L = model.config.n_tokens + 5, model.config.context_length
    g = torch.Generator().manual_seed(0)
    panel = torch.randperm(V - 30, generator=g)[:300] + 30
    labels = np.arange(n) % 2
    animals = np.array([f"{'ab'[c]}{i % 4}" for i, c in enumerate(labels)])
    owner = {a: "ab"[c] for a, c in zip(animals, labels)}
    with Profiler(model, groups=["a", "b"], genes=V, window=64, n_context=3, replicates=owner) as prof, \
            torch.inference_mode():  # fmt: skip
        for s in range(0, n, 32):
            b = min(32, n - s)
            lengths = torch.randint(150, 251, (b,), generator=g).clamp(max=L)
            t = torch.ones(b, int(lengths.max()), dtype=torch.long)
            t[:, :3] = torch.tensor([4, 6, 7])
            for c in range(b):
                t[c, 3 : lengths[c]] = panel[torch.randperm(300, generator=g)[: lengths[c] - 3]]
            prof.set_batch(groups=labels[s : s + b], tokens=t, replicates=animals[s : s + b])
            model(t)
    return prof.profile.compare("a", "b", min_cells=1, permutations=permutations)


@pytest.mark.parametrize("cells", [64, 128])
def test_permutations_peak_memory(benchmark, full, cells):
    """999 relabelings of the animals of a 300-gene panel dataset at Nicheformer scale (quick: 99, small
    model), at compare time: the block sums are the memory, flat in the number of cells and permutations."""
    perms = 999 if full else 99
    benchmark.group = "memory: attnprof with permutations"
    approach = f"permutations-{perms}-{'full' if full else 'small'}"
    result = benchmark.pedantic(measure, args=(approach, cells if full else cells // 4), rounds=1, iterations=1)
    benchmark.extra_info.update(contender=f"attnprof + compare, {perms} relabelings, {cells} panel cells",
                                peak_rss_mb=round(result["peak_mb"]), run_s=round(result["seconds"], 2),
                                baseline=cells == 64)  # fmt: skip


if __name__ == "__main__":  # one measured run: python bench_memory.py <approach> <cells>
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if sys.argv[1].startswith("permutations-"):  # permutations-<N>-<full|small>
        _, perms, size = sys.argv[1].split("-")
        config = NicheformerConfig() if size == "full" else NicheformerConfig.small(n_tokens=2000, context_length=256)
        net = Nicheformer(config).eval()
        start = time.perf_counter()
        _, peak = peak_rss_mb(lambda: run_permutations(net, int(sys.argv[2]), int(perms)))
        print(json.dumps({"peak_mb": peak, "seconds": time.perf_counter() - start}))
        sys.exit()
    net = Nicheformer(NicheformerConfig.small(n_tokens=20_340, context_length=128)).eval()
    run = run_attnprof if sys.argv[1] == "attnprof" else run_keep_every_map
    start = time.perf_counter()
    _, peak = peak_rss_mb(lambda: run(net, int(sys.argv[2])))
    print(json.dumps({"peak_mb": peak, "seconds": time.perf_counter() - start}))
