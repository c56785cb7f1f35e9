"""torch.distributed: `attnprof run` under torchrun (2 CPU ranks, gloo) equals a single-process run."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from attnprof import Profile
from attnprof.cli import main
from attnprof.distributed import all_reduce_profile, process_group, rank_and_world, shard, sum_over_ranks
from attnprof.singlecell.demo import write_demo_inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_demo_inputs(tmp_path_factory.mktemp("inputs"), n_cells=36, n_genes=40, seed=8)


def run_argv(inputs, out):
    return ["run", str(inputs["data.h5ad"]), "--groupby", "sex", "--model", str(inputs["model.ckpt"]),
            "--vocab", str(inputs["vocab.txt"]), "--means", str(inputs["means.npy"]), "--panel", "Esr1,Ar",
            "--window", "16", "--batch-size", "4", "--threads", "1", "--permutations", "2", "--replicate", "animal",
            "--min-cells", "2",
            "--checkpoint-every", "4", "--no-figures", "--quiet", "--out", str(out)]  # fmt: skip


def test_torchrun_ranks_sum_to_the_single_process_run(inputs, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "attnprof.cli"]  # fmt: skip
    done = subprocess.run([*launcher, *run_argv(inputs, tmp_path / "dist")], capture_output=True, text=True,
                          env=env, timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("profiled 36 cells (female 18, male 18)") == 1  # rank 0 alone prints

    n = torch.get_num_threads()
    try:
        assert main(run_argv(inputs, tmp_path / "single")) == 0
    finally:
        torch.set_num_threads(n)

    def files(out):
        return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())

    assert files(tmp_path / "dist") == files(tmp_path / "single")  # no per-rank leftovers (checkpoints)
    dist_profile = Profile.load(tmp_path / "dist" / "profile.npz")
    single = Profile.load(tmp_path / "single" / "profile.npz")
    assert dist_profile.meta["world_size"] == 2 and dist_profile.meta["data"]["cells"] == single.meta["data"]["cells"]
    assert dist_profile.meta["data"]["cells_digest"] == single.meta["data"]["cells_digest"]
    assert dist_profile.layout() == single.layout() and dist_profile.blocks == single.blocks
    assert single.replicates == {"female": 6, "male": 6}  # the ranks split the animals' cells
    for name, ref in single.sums.items():
        np.testing.assert_allclose(dist_profile.sums[name], ref, rtol=1e-12, atol=0, err_msg=name)
    layers = pd.read_csv(tmp_path / "dist" / "tables" / "layers.csv")
    pd.testing.assert_frame_equal(layers, pd.read_csv(tmp_path / "single" / "tables" / "layers.csv"), rtol=1e-9)
    assert layers["p_perm_max_abs_diff"].notna().all()


def test_shards_cover_every_cell_once_and_are_balanced():
    for n, world in [(10, 3), (2, 4), (0, 2), (7, 1)]:
        parts = [shard(n, r, world) for r in range(world)]
        assert sorted(np.concatenate(parts).tolist()) == list(range(n))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="rank 2 is outside a world of 2"):
        shard(5, 2, 2)


def test_outside_a_distributed_job_nothing_is_set_up(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with process_group("cpu") as (rank, world):
        assert (rank, world) == (0, 1) == rank_and_world()
        assert not torch.distributed.is_initialized()
    assert sum_over_ranks(5) == 5
    with pytest.raises(RuntimeError, match="needs torch.distributed initialized"):
        all_reduce_profile(None)
