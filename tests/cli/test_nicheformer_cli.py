"""Nicheformer options from the command line: --assay Xenium / 9, --tokenization, counts holding NaN."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from attnprof import Profile
from attnprof.cli import main
from attnprof.singlecell.demo import write_demo_inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_demo_inputs(tmp_path_factory.mktemp("inputs"), n_cells=24, n_genes=40, seed=2)


def run(inputs, out, *extra) -> Profile:
    argv = ["run", str(inputs["data.h5ad"]), "--groupby", "sex", "--model", str(inputs["model.ckpt"]),
            "--vocab", str(inputs["vocab.txt"]), "--means", str(inputs["means.npy"]), "--out", str(out),
            "--no-figures", "--quiet", *extra]  # fmt: skip
    assert main(argv) == 0  # one torch thread: tests/conftest.py
    return Profile.load(out / "profile.npz")


def test_assay_by_name_and_by_number_and_the_tokenization(inputs, tmp_path):
    by_name = run(inputs, tmp_path / "name", "--assay", "Xenium", "--species", "human")
    by_number = run(inputs, tmp_path / "number", "--assay", "9", "--species", "5")
    dataset = run(inputs, tmp_path / "dataset", "--assay", "9", "--species", "5", "--tokenization", "dataset")
    for profile, tokenization in ((by_name, "notebook"), (by_number, "notebook"), (dataset, "dataset")):
        settings = profile.meta["options"]["tokenizer"]
        assert settings["context"] == [5, 9, 4] and settings["tokenization"] == tokenization
    for name in by_name.sums:
        np.testing.assert_array_equal(by_name.sums[name], by_number.sums[name], err_msg=name)


def test_unknown_tokenization_and_assay_id_fail_clearly(inputs, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(inputs, tmp_path / "a", "--tokenization", "scanpy")
    assert "invalid choice: 'scanpy'" in capsys.readouterr().err
    assert main(["run", str(inputs["data.h5ad"]), "--groupby", "sex", "--vocab", str(inputs["vocab.txt"]),
                 "--assay", "42", "--out", str(tmp_path / "b"), "--quiet"]) != 0  # fmt: skip
    assert "assay id 42 is not a Nicheformer assay token" in capsys.readouterr().err


def test_nan_counts_stop_the_run_before_any_batch(inputs, tmp_path, capsys):
    adata = ad.read_h5ad(inputs["data.h5ad"])
    X = adata.X.toarray() if hasattr(adata.X, "toarray") else np.array(adata.X)
    X[[3, 20], 5] = np.nan
    X[20, 7] = np.inf
    adata.X = X
    adata.write_h5ad(tmp_path / "nan.h5ad")
    argv = ["run", str(tmp_path / "nan.h5ad"), "--groupby", "sex", "--vocab", str(inputs["vocab.txt"]),
            "--out", str(tmp_path / "out"), "--quiet"]  # fmt: skip
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert "NaN or Inf values in 2 of 24 cells and 2 genes" in err and "np.nan_to_num" in err
    assert not (tmp_path / "out" / "profile.npz").exists()
