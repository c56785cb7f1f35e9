"""Resume: a run killed (SIGKILL) or failing mid-way resumes from its checkpoint to the uninterrupted result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from attnprof import Profile
from attnprof.checkpoint import Checkpoint
from attnprof.cli import main
from attnprof.singlecell import profile_anndata, small_nicheformer
from attnprof.singlecell.demo import (
    technology_means,
    write_demo_inputs,
)
from helpers import assert_same_sums, demo_fixtures


# ------------------------------------------------------- a killed CLI run
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_demo_inputs(tmp_path_factory.mktemp("inputs"), n_cells=120, n_genes=40, seed=9)


def run_argv(inputs, out):
    # a checkpoint after every batch of 4 cells: the first appears after 4 of 120 cells
    return ["run", str(inputs["data.h5ad"]), "--groupby", "sex", "--model", str(inputs["model.ckpt"]),
            "--vocab", str(inputs["vocab.txt"]), "--means", str(inputs["means.npy"]), "--window", "16",
            "--batch-size", "4", "--checkpoint-every", "4", "--permutations", "1", "--threads", "1",
            "--no-figures", "--quiet", "--out", str(out)]  # fmt: skip


def kill_after_first_checkpoint(argv, checkpoint) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "attnprof.cli", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 180
    try:
        while not checkpoint.exists():
            if proc.poll() is not None:
                pytest.fail(f"the run ended (status {proc.returncode}) before its first checkpoint: "
                            f"{proc.stderr.read().decode()[-2000:]}")  # fmt: skip
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"


def test_killed_run_resumes_to_the_uninterrupted_result(inputs, tmp_path):
    out = tmp_path / "run"
    checkpoint = out / "checkpoint.npz"
    kill_after_first_checkpoint(run_argv(inputs, out), checkpoint)
    with np.load(checkpoint) as saved:
        done = len(saved["ckpt_done"])
    assert 0 < done < 120 and not (out / "profile.npz").exists()
    umask = os.umask(0)
    os.umask(umask)
    assert checkpoint.stat().st_mode & 0o777 == 0o666 & ~umask  # like every other output (0644), not 0600

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    again = subprocess.run([sys.executable, "-m", "attnprof.cli", *run_argv(inputs, out)], env=env,
                           capture_output=True, text=True, timeout=300)  # the same command again  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert f"resuming: {done} of 120 cells already done (checkpoint {checkpoint})" in again.stderr
    # the rate counts only the cells this run profiled, in this run's time
    assert f"profiled {120 - done} cells in " in again.stdout and f"and {done} from the checkpoint: 120 cells" in again.stdout
    record = json.loads((out / "run.json").read_text())
    assert "checkpoint.npz" not in record["outputs"] and set(record["outputs"]) >= {"profile.npz", "run.json"}
    assert record["resumed_cells"] == done and record["cells"] == {"female": 60, "male": 60}
    assert not checkpoint.exists() and not list(out.glob("*.tmp"))  # finished: nothing left to resume

    assert main(run_argv(inputs, tmp_path / "uninterrupted")) == 0
    assert_same_sums(Profile.load(out / "profile.npz"), Profile.load(tmp_path / "uninterrupted" / "profile.npz"))


# ------------------------------------------------- failures in the Python API
adata, vocab, means, model = demo_fixtures(n_cells=40, n_genes=40, seed=10, context_length=40)


def run(model, adata, vocab, **kw):
    options = dict(vocab=vocab, means=technology_means(adata, vocab), window=16, batch_size=4, chunk_size=8,
                   bucket_size=12, backend="torch", progress=False)  # fmt: skip
    return profile_anndata(model, adata, "sex", **{**options, **kw})


class Crash(Exception):
    pass


def crash_after(model, forwards: int):
    """A hook that fails the model's forward number ``forwards + 1``; remove it with ``.remove()``."""
    calls = []

    def hook(module, args):
        calls.append(1)
        if len(calls) > forwards:
            raise Crash(f"crash in forward {len(calls)}")

    return model.register_forward_pre_hook(hook)


def recording(model):
    """A hook that records the token batches the model sees; remove it with ``.remove()``."""
    seen = []
    handle = model.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    return seen, handle


@pytest.mark.parametrize("forwards", [2, 4, 9])  # mid-bucket, at a bucket's end (16 cells), in the last bucket
def test_failed_run_resumes_without_counting_a_cell_twice(model, adata, vocab, tmp_path, forwards):
    path = tmp_path / "ckpt.npz"
    handle = crash_after(model, forwards)
    try:
        with pytest.raises(Crash):
            run(model, adata, vocab, checkpoint=path, checkpoint_every=4)
    finally:
        handle.remove()
    assert path.exists()
    seen, handle = recording(model)
    try:
        resumed = run(model, adata, vocab, checkpoint=path, checkpoint_every=4)
        n_resumed = len(seen)
        uninterrupted = run(model, adata, vocab)
    finally:
        handle.remove()
    assert resumed.meta["resumed_cells"] == 4 * forwards
    assert not path.exists()
    assert_same_sums(resumed, uninterrupted)
    # the resumed run made exactly the batches the uninterrupted one made after the crash point
    rest = seen[n_resumed + forwards :]
    assert len(rest) == n_resumed and all(torch.equal(a, b) for a, b in zip(seen[:n_resumed], rest))


def test_checkpoints_follow_checkpoint_every_and_shards_keep_their_own(model, adata, vocab, tmp_path):
    path = tmp_path / "ckpt.npz"
    handle = crash_after(model, 3)  # 3 batches of 4 cells ran
    try:
        with pytest.raises(Crash):
            run(model, adata, vocab, checkpoint=path, checkpoint_every=6, shard=(1, 2))
    finally:
        handle.remove()
    shard_file = tmp_path / "ckpt.shard1of2.npz"
    with np.load(shard_file) as saved:
        assert len(saved["ckpt_done"]) == 8  # saved after 8 cells (>= 6); the 4 after are not saved
    resumed = run(model, adata, vocab, checkpoint=path, checkpoint_every=6, shard=(1, 2))
    assert_same_sums(resumed, run(model, adata, vocab, shard=(1, 2)))
    assert not shard_file.exists()


def test_checkpoints_of_another_shard_count_are_refused(model, adata, vocab, tmp_path):
    """Resuming with another number of shards (or torchrun ranks) would ignore the old files: refused."""
    path = tmp_path / "ckpt.npz"
    handle = crash_after(model, 1)
    try:
        with pytest.raises(Crash):
            run(model, adata, vocab, checkpoint=path, checkpoint_every=4, shard=(1, 2))
    finally:
        handle.remove()
    for shard in (None, (0, 3)):
        with pytest.raises(ValueError, match=r"checkpoints of a run with another number of shards or ranks "
                                             r"\(ckpt.shard1of2.npz\); this run has (1|3): resume with the same"):
            run(model, adata, vocab, checkpoint=path, shard=shard)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.shard1of2.npz"]


def test_a_finished_checkpoint_returns_without_running_the_model(model, adata, vocab, tmp_path, monkeypatch):
    path = tmp_path / "ckpt.npz"
    monkeypatch.setattr(Checkpoint, "remove", lambda self: None)  # as if killed right before the removal
    whole = run(model, adata, vocab, checkpoint=path, checkpoint_every=4)
    handle = crash_after(model, 0)  # any forward now fails
    try:
        again = run(model, adata, vocab, checkpoint=path, checkpoint_every=4)
    finally:
        handle.remove()
    assert_same_sums(again, whole)


def test_a_stale_temporary_file_is_cleaned_up(model, adata, vocab, tmp_path):
    stale = tmp_path / "ckpt.npz12345.tmp"  # what a run killed while saving leaves
    stale.write_bytes(b"half a checkpoint")
    run(model, adata, vocab, checkpoint=tmp_path / "ckpt.npz")
    assert not stale.exists()


@pytest.mark.parametrize(
    ("change", "differs"),
    [
        ({"subset": "cell_type != 'microglia'"}, r"data.cells, data.subset"),
        ({"model": "other"}, r"model.weights"),
        ({"window": 8}, r"options.window"),
        ({"seed": 1}, r"options.blocks.seed"),
        ({"batch_size": 8}, r"options.batch_size"),
        ({"shard": (0, 1)}, r"data.shard"),
    ],
    ids=["data", "model", "window", "permutation-seed", "batching", "shard"],
)
def test_a_checkpoint_of_another_run_is_refused_and_kept(model, adata, vocab, tmp_path, change, differs):
    path = tmp_path / "ckpt.npz"
    handle = crash_after(model, 2)
    try:
        with pytest.raises(Crash):
            run(model, adata, vocab, checkpoint=path, checkpoint_every=4, shard=(0, 1) if "shard" not in change
                else (0, 2))  # fmt: skip
    finally:
        handle.remove()
    path = path if "shard" not in change else tmp_path / "ckpt.shard0of2.npz"
    before = path.read_bytes()
    other = small_nicheformer(vocab.n_tokens, seed=12, n_layers=2, context_length=40)
    kw = {k: v for k, v in change.items() if k != "model"}
    if "shard" in change:  # the file of shard 0 of 2, given to a run that is not sharded
        kw["checkpoint"] = path
    with pytest.raises(ValueError, match=rf"checkpoint .* is from another run \({differs} differ\).*delete it"):
        run(other if "model" in change else model, adata, vocab, **{"checkpoint": path, **kw})
    assert path.read_bytes() == before  # refused, not overwritten
