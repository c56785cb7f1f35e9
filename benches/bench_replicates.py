"""Permutations at compare time: what they cost a run, and how fast the null of many relabelings is.

1. ``attnprof run --replicate animal --permutations 99`` against the same run with ``--permutations 0``,
   side by side in interleaved rounds, each a fresh process (wall time and peak RSS of the child). Full
   mode: the issue's scRNA-seq-like workload, 48 cells of 600-1,000 expressed genes drawn from an
   8,000-gene pool, 6 animals per sex (4 cells each, --min-cells 2), the full-size Nicheformer (12 layers, 16 heads, d_model 512,
   context 1,500, random weights) on the machine's default threads. Quick mode: a small model, 24 cells.
2. The permutation null alone: 9,999 relabelings of 12 replicates for a 12-layer, 16-head profile over
   10,000 genes (``attnprof.statistics.head_null``, the work ``compare`` does per family and layer).
   Quick mode: 2 layers, 500 genes, 999 relabelings.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from attnprof.singlecell.nicheformer import Nicheformer, NicheformerConfig, save_checkpoint
from attnprof.statistics import head_null, relabelings


#: 6 animals per sex, 4 cells each in full mode (an element counts in a replicate with >= 2 cells): 924
#: distinct relabelings, so 99 and 999 are random draws (Monte Carlo), not an enumeration.
ANIMALS = 12


@pytest.fixture(scope="module")
def inputs(full, tmp_path_factory):
    """An .h5ad of scRNA-seq-like counts with sex and animal columns, its vocabulary and a checkpoint."""
    folder = tmp_path_factory.mktemp("replicates")
    pool, (lo, hi), n_cells = (8000, (600, 1000), 48) if full else (600, (60, 100), 24)
    config = NicheformerConfig(n_tokens=pool + 30) if full else NicheformerConfig.small(pool + 30, context_length=128)
    torch.manual_seed(0)
    save_checkpoint(Nicheformer(config).eval(), folder / "model.ckpt")
    rng = np.random.default_rng(0)
    X = np.zeros((n_cells, pool), dtype=np.float32)
    for c in range(n_cells):
        genes = rng.choice(pool, size=int(rng.integers(lo, hi + 1)), replace=False)
        X[c, genes] = rng.integers(1, 30, size=len(genes))
    animal = np.arange(n_cells) % ANIMALS
    obs = pd.DataFrame({"sex": np.where(animal < ANIMALS // 2, "female", "male"), "animal": [f"a{a}" for a in animal]},
                       index=[f"c{i}" for i in range(n_cells)])  # fmt: skip
    genes = [f"G{i}" for i in range(pool)]
    ad.AnnData(sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(folder / "data.h5ad")
    (folder / "vocab.txt").write_text("\n".join(genes) + "\n")
    return folder


#: Runs the CLI and prints the process's own peak RSS (KB) as the last line of stderr.
PEAK_WRAPPER = """
import resource, runpy, sys
sys.argv = ["attnprof", *sys.argv[1:]]
try:
    runpy.run_module("attnprof.cli", run_name="__main__")
finally:
    print("peak_rss_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def run_cli(folder: Path, permutations: int, out: str) -> tuple[float, float]:
    """One ``attnprof run`` in a fresh process: (wall seconds, the child's peak RSS in MB)."""
    argv = [sys.executable, "-c", PEAK_WRAPPER, "run", str(folder / "data.h5ad"), "--groupby", "sex",
            "--replicate", "animal", "--model", str(folder / "model.ckpt"), "--vocab", str(folder / "vocab.txt"),
            "--permutations", str(permutations), "--min-cells", "2", "--no-figures", "--quiet", "--overwrite", "--out", str(folder / out)]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    peak_kb = int(proc.stderr.strip().splitlines()[-1].split()[-1])
    return wall, peak_kb / 1024


def test_run_with_permutations_costs_what_a_run_without_does(benchmark, inputs, full):
    """--permutations 99 and 999 vs 0: interleaved rounds, min wall time each; each run's own peak RSS."""
    benchmark.group = "run: permutations at compare time"
    rounds = 3 if full else 1
    counts = (0, 99, 999)
    times, peaks = {n: [] for n in counts}, {n: 0.0 for n in counts}
    for _ in range(rounds):
        for n in counts:
            wall, peak = run_cli(inputs, n, f"out{n}")
            times[n].append(wall)
            peaks[n] = max(peaks[n], peak)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    info = {"contender": "attnprof run --replicate animal, 99 and 999 vs 0 permutations"}
    for n in counts:
        info.update({f"s_{n}": round(min(times[n]), 2), f"peak_rss_mb_{n}": round(peaks[n])})
    for n in counts[1:]:
        info.update({f"x_time_{n}": round(min(times[n]) / min(times[0]), 3), f"extra_rss_mb_{n}": round(peaks[n] - peaks[0])})
        print(f"\n{n} vs 0 permutations: {min(times[n]):.2f} s vs {min(times[0]):.2f} s = "
              f"{min(times[n]) / min(times[0]):.3f}x; peak RSS {peaks[n]:.0f} MB vs {peaks[0]:.0f} MB")  # fmt: skip
    benchmark.extra_info.update(info)


def test_null_of_many_relabelings(benchmark, full):
    """9,999 relabelings of 12 replicates, 12 layers x 16 heads x 10,000 genes (quick: 2 x 16 x 500, 999)."""
    layers, heads, genes, n = (12, 16, 10_000, 9_999) if full else (2, 16, 500, 999)
    rng = np.random.default_rng(0)
    X = rng.random((12, heads, genes)) * 1e-3  # replicate means
    V = (rng.random((12, genes)) < 0.97).astype(np.float64)  # a few genes missing in some replicates
    draws = relabelings(np.arange(12) < 6, None, n=n, seed=0)
    in_a = draws.in_a if draws.n == n else np.vstack([draws.in_a, rng.permuted(np.resize(np.arange(12) < 6, (n + 1 - len(draws.in_a), 12)), axis=1)])  # fmt: skip

    def run():
        for _ in range(layers):
            head_null(X * V[:, None], V, in_a, 2)

    benchmark.group = "compare: permutation null"
    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(contender=f"{n} relabelings, {layers} layers x {heads} heads x {genes} genes",
                                seconds=round(benchmark.stats.stats.min, 2))  # fmt: skip
