"""Behaviours where a held-out audit's planted one-line bugs survived the suite (issue 22, item 8): one test
each, asserting what a user gets. (Merging a profile with permutations into one without is issue 20's.)"""

from __future__ import annotations

import hashlib
import json
import shutil

import anndata as ad
import numpy as np
import pytest
import torch
from torch import nn

import attnprof
from attnprof import Profile, attention_stats
from attnprof.cli import main
from attnprof.kernels.blocked import FUSED_MIN_SCORES
from attnprof.singlecell import profile_anndata, small_nicheformer
from attnprof.singlecell.demo import write_demo_inputs
from helpers import assert_same_sums, assert_sums_close, random_batch, spec_for


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_demo_inputs(tmp_path_factory.mktemp("inputs"), n_cells=16, n_genes=30, seed=4)


def run_argv(inputs, out, *extra, data=None):
    return [str(a) for a in ["run", data or inputs["data.h5ad"], "--groupby", "sex", "--model", inputs["model.ckpt"],
                             "--vocab", inputs["vocab.txt"], "--means", inputs["means.npy"], "--window", "8",
                             "--threads", "1", "--quiet", "--permutations", "0", "--min-cells", "1", "--no-figures",
                             "--out", out, *extra]]  # fmt: skip


def digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


# ------------------------------------------------------------------ kernels
def test_uncounted_cells_with_an_explicit_scale_on_the_eager_torch_path():
    """Cells of group -1 run (their output is exact) but add nothing; a non-default scale reaches every sum."""
    q, k, v, padding, _, tokens = random_batch(3, B=5, H=2, L=7, D=4, n_groups=2)
    assert 2 * 7 * 7 < FUSED_MIN_SCORES  # small cells: the eager row-block loop of the torch backend
    groups = torch.tensor([0, -1, 1, -1, 0])
    spec = spec_for(2, 7)

    def stats(backend, scale, cells=slice(None)):
        return attention_stats(q[cells], k[cells], v[cells], spec=spec, groups=groups[cells],
                               key_padding_mask=padding[cells], tokens=tokens[cells], scale=scale,
                               backend=backend)  # fmt: skip

    out, sums = stats("torch", 0.3)
    ref_out, ref_sums = stats("reference", 0.3)
    assert_sums_close(sums, ref_sums)
    torch.testing.assert_close(out, ref_out)
    counted = [0, 2, 4]
    assert_sums_close(sums, stats("torch", 0.3, counted)[1])  # the -1 cells add nothing
    assert sums["cells"].tolist() == [2, 1]
    default = stats("torch", None)[1]  # scale=None is 1/sqrt(D) = 0.5: another result
    assert not torch.allclose(sums["summary_sum"], default["summary_sum"])


def test_two_equal_shape_unmasked_batches_with_different_labels():
    """A session's second batch has the first's shape and no mask: its own labels count, not the first's."""
    torch.manual_seed(0)
    model = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(2, 3, 6, 8)

    def profile(batches):
        with attnprof.Profiler(model, groups=["a", "b"], window=6, backend="torch") as prof, torch.no_grad():
            for xb, labels in batches:
                prof.set_batch(groups=labels)
                model(xb, xb, xb, need_weights=False)
        return prof.profile

    both = profile([(x[0], [0, 0, 1]), (x[1], [1, 1, 0])])
    first, second = profile([(x[0], [0, 0, 1])]), profile([(x[1], [1, 1, 0])])
    first, second = first.group_sums(), second.group_sums()  # each session deals its own pseudo-replicates
    for name, value in both.group_sums().items():
        np.testing.assert_allclose(value, first[name] + second[name], rtol=1e-12, err_msg=name)
    assert both.cells == {"a": 3, "b": 3}


# ------------------------------------------------------------------- tables
def test_the_heads_tables_where_names_the_gene_that_holds_max_abs_diff(inputs, tmp_path):
    out = tmp_path / "out"
    assert main(run_argv(inputs, out)) == 0
    profile = Profile.load(out / "profile.npz")
    comparison = profile.compare("female", "male", min_cells=1, permutations=0)
    special = set(profile.meta["special_tokens"])
    s, ia, ib = profile.group_sums(), profile.group_index("female"), profile.group_index("male")
    count_a, count_b = s["recv_count"][:, ia], s["recv_count"][:, ib]  # [layers, vocab]
    with np.errstate(invalid="ignore", divide="ignore"):
        diff = s["recv_sum"][:, ia] / count_a[:, None] - s["recv_sum"][:, ib] / count_b[:, None]
    seen = (count_a >= 1) & (count_b >= 1)
    seen[:, sorted(special)] = False
    heads = comparison.heads[comparison.heads["family"] == "gene"]
    for row in heads.itertuples():
        d = np.where(seen[row.layer], np.abs(diff[row.layer, row.head]), -np.inf)
        assert row.where == profile.genes[int(np.argmax(d))]
        assert row.max_abs_diff == pytest.approx(d.max(), rel=1e-12)


# ------------------------------------------------------------ cells, merges
def test_cell_ids_do_not_depend_on_the_data_files_folder(inputs, tmp_path, capsys):
    """One file read from two folders (two machines' mounts) names the same cells: merging them is refused."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        shutil.copy(inputs["data.h5ad"], tmp_path / name / "cells.h5ad")
        assert main(run_argv(inputs, tmp_path / f"out_{name}", data=tmp_path / name / "cells.h5ad")) == 0
    a, b = (Profile.load(tmp_path / f"out_{n}" / "profile.npz") for n in "ab")
    np.testing.assert_array_equal(a.cell_ids, b.cell_ids)
    capsys.readouterr()
    status = main(["merge", str(tmp_path / "out_a"), str(tmp_path / "out_b"), "-o", str(tmp_path / "m.npz")])
    err = capsys.readouterr().err
    assert status == 2 and "share 16 cells" in err and "disjoint cells" in err and not (tmp_path / "m.npz").exists()


# --------------------------------------------------------------- run folders
def test_a_stray_profile_npz_is_refused_without_overwrite(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "profile.npz").write_bytes(b"someone's profile")
    assert main(run_argv(inputs, out)) == 2
    assert f"--out {out} holds a profile.npz of no listed run" in capsys.readouterr().err
    assert digest(out) == {"profile.npz": hashlib.sha256(b"someone's profile").hexdigest()}


def test_run_json_lists_the_files_the_run_rewrote(inputs, tmp_path):
    """A rerun with --overwrite writes the same files, some byte for byte: every one is listed as its own."""
    out = tmp_path / "out"
    assert main(run_argv(inputs, out)) == 0
    first = json.loads((out / "run.json").read_text())["outputs"]
    assert main(run_argv(inputs, out, "--overwrite")) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["outputs"] == first and set(record["outputs"]) == set(digest(out))


# ------------------------------------------------------------------- counts
def test_a_single_non_integer_cell_is_not_taken_for_log1p_data(inputs, tmp_path, capsys):
    adata = ad.read_h5ad(inputs["data.h5ad"])
    X = np.zeros(adata.shape, dtype=np.float32)
    row = np.asarray(ad.read_h5ad(inputs["data.h5ad"]).X[0].todense()).ravel()
    X[0] = np.log1p(row / row.sum() * 1e4)  # one cell that looks exactly like log1p data, the rest empty
    adata.X = X
    adata.write_h5ad(tmp_path / "one.h5ad")
    main(run_argv(inputs, tmp_path / "out", data=tmp_path / "one.h5ad"))
    err = capsys.readouterr().err
    assert "non-integer values and is tokenized as it is" in err and "log1p of normalized counts" not in err


def test_negative_counts_in_a_late_chunk_are_refused_before_the_first_batch(inputs):
    adata = ad.read_h5ad(inputs["data.h5ad"])
    X = np.asarray(adata.X.todense())
    X[-1, 3] = -1  # the last cell, in the last chunk of 4
    adata.X = X
    model = small_nicheformer(len(ad.read_h5ad(inputs["data.h5ad"]).var_names) + 30, seed=0, n_layers=1)
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    with pytest.raises(ValueError, match="negative values"):
        profile_anndata(model, adata, "sex", chunk_size=4, batch_size=2, progress=False)
    assert forwards == []


def test_a_run_interrupted_twice_resumes_to_the_uninterrupted_result(inputs, tmp_path):
    adata = ad.read_h5ad(inputs["data.h5ad"])
    model = small_nicheformer(adata.n_vars + 30, seed=0, n_layers=1, context_length=64)

    def run(**kw):
        return profile_anndata(model, adata, "sex", window=8, batch_size=2, chunk_size=4, bucket_size=6,
                               progress=False, **kw)  # fmt: skip

    whole = run()

    class Crash(Exception):
        pass

    def crash_after(n):
        calls = []

        def hook(module, args):
            calls.append(1)
            if len(calls) > n:
                raise Crash

        return model.register_forward_pre_hook(hook)

    ckpt = tmp_path / "ckpt.npz"
    done = []
    for n in (2, 3):  # the second run resumes, then is interrupted again
        handle = crash_after(n)
        try:
            with pytest.raises(Crash):
                run(checkpoint=ckpt, checkpoint_every=2)
        finally:
            handle.remove()
        with np.load(ckpt) as saved:
            done.append(len(saved["ckpt_done"]))
    assert 0 < done[0] < done[1] < 16
    resumed = run(checkpoint=ckpt, checkpoint_every=2)
    assert resumed.meta["resumed_cells"] == done[1]
    assert_same_sums(resumed, whole)


# --------------------------------------------------------------- checkpoints
def test_a_checkpoint_written_under_numpy_1_loads_without_trust(inputs, tmp_path, capsys):
    """Lightning leaves numpy float64 scalars in the optimizer state; numpy 1 pickles them as
    numpy.core.multiarray.scalar (numpy 2: numpy._core): both are plain numbers, loaded without trust."""
    ckpt = torch.load(inputs["model.ckpt"], weights_only=True)
    ckpt["lr_schedulers"] = [{"_last_lr": [np.float64(1e-4)]}]
    torch.save(ckpt, tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)  # one plain pickle stream
    raw = (tmp_path / "legacy.ckpt").read_bytes()
    assert b"numpy._core.multiarray" in raw or b"numpy.core.multiarray" in raw
    (tmp_path / "numpy1.ckpt").write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    argv = run_argv(inputs, tmp_path / "out")
    argv[argv.index("--model") + 1] = str(tmp_path / "numpy1.ckpt")
    assert main(argv) == 0, capsys.readouterr().err
    assert Profile.load(tmp_path / "out" / "profile.npz").meta["model"]["weights"] == \
        Profile.load(_reference_run(inputs, tmp_path)).meta["model"]["weights"]  # fmt: skip


def _reference_run(inputs, tmp_path):
    assert main(run_argv(inputs, tmp_path / "ref")) == 0
    return tmp_path / "ref" / "profile.npz"
