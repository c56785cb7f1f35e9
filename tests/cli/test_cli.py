"""The attnprof command: run writes every output and agrees with the Python API; demo; validate; plot; errors."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from attnprof import Profile
from attnprof.cli import main
from attnprof.singlecell import load_nicheformer, profile_anndata, small_nicheformer
from attnprof.singlecell.demo import write_demo_inputs
from attnprof.validate import TOLERANCE

TABLES = ("heads", "layers", "genes", "context", "pairs", "summaries")
FIGURES = ("layer_differences", "attention_maps", "head_differences")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A small h5ad with a matching vocabulary, means, panel and checkpoint (public key layout)."""
    return write_demo_inputs(tmp_path_factory.mktemp("inputs"), n_cells=60, n_genes=50, seed=5)


def model_args(inputs):
    return ["--model", str(inputs["model.ckpt"]), "--vocab", str(inputs["vocab.txt"]),
            "--means", str(inputs["means.npy"])]  # fmt: skip


@pytest.fixture(scope="module")
def run_out(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    argv = ["run", str(inputs["data.h5ad"]), "--groupby", "sex", *model_args(inputs), "--panel", "Esr1,Ar,Pgr,Gal",
            "--window", "32", "--batch-size", "16", "--permutations", "0", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0  # one torch thread: tests/conftest.py
    return out


def test_run_writes_every_output(run_out, capsys):
    expected = {"profile.npz", "run.json", "report.html", "tables/genes.h5ad"}
    expected |= {f"tables/{t}.{ext}" for t in TABLES for ext in ("csv", "parquet")}
    expected |= {f"figures/{f}.{ext}" for f in FIGURES for ext in ("png", "pdf")}
    written = {str(p.relative_to(run_out)) for p in run_out.rglob("*") if p.is_file()}
    assert written == expected
    record = json.loads((run_out / "run.json").read_text())
    assert record["contrast"] == ["female", "male"] and record["cells"] == {"female": 30, "male": 30}
    genes = ad.read_h5ad(run_out / "tables" / "genes.h5ad")
    assert genes.n_obs == 3 * 4  # layers x heads of the small model


def test_run_numbers_match_the_python_api(run_out, inputs):
    model = load_nicheformer(inputs["model.ckpt"])
    profile = profile_anndata(model, inputs["data.h5ad"], "sex", vocab=inputs["vocab.txt"], means=inputs["means.npy"],
                              panel=["Esr1", "Ar", "Pgr", "Gal"], window=32, progress=False)  # fmt: skip
    saved = Profile.load(run_out / "profile.npz")
    assert saved.layout() == profile.layout()
    for name in profile.sums:
        np.testing.assert_allclose(saved.sums[name], profile.sums[name], rtol=1e-10, err_msg=name)
    comparison = profile.compare("female", "male", permutations=0)  # the run's --permutations 0
    for table in TABLES:
        on_disk = pd.read_parquet(run_out / "tables" / f"{table}.parquet")
        expected = getattr(comparison, table)
        assert list(on_disk.columns) == list(expected.columns)
        numeric = expected.select_dtypes("number").columns
        np.testing.assert_allclose(on_disk[numeric].to_numpy(float), expected[numeric].to_numpy(float),
                                   rtol=1e-7, equal_nan=True, err_msg=table)  # fmt: skip


def test_run_prints_the_layer_summary(inputs, tmp_path, capsys):
    argv = ["run", str(inputs["data.h5ad"]), "--groupby", "sex", *model_args(inputs), "--out", str(tmp_path),
            "--no-figures", "--quiet", "--permutations", "0"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "profiled 60 cells (female 30, male 30)" in out
    assert "female − male" in out and "position" in out and "gene" in out
    assert len([line for line in out.splitlines() if line.strip()[:1].isdigit()]) == 3  # one row per layer
    assert not (tmp_path / "figures").exists()


def test_more_than_two_groups_need_compare(inputs, tmp_path, capsys):
    base = ["run", str(inputs["data.h5ad"]), "--groupby", "cell_type", *model_args(inputs), "--out", str(tmp_path),
            "--no-figures", "--quiet", "--permutations", "0"]  # fmt: skip
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "has 5 groups (excitatory neuron, inhibitory neuron, astrocyte" in err and "--compare A B" in err
    assert main([*base, "--compare", "astrocyte", "microglia", "--min-cells", "1"]) == 0  # 9 microglia
    profile = Profile.load(tmp_path / "profile.npz")  # every group is profiled and kept, the compared first
    assert profile.groups[:2] == ["astrocyte", "microglia"] and len(profile.groups) == 5


@pytest.fixture(scope="module")
def labeled(inputs, tmp_path_factory):
    """The inputs' data with some unlabeled cells."""
    adata = ad.read_h5ad(inputs["data.h5ad"])
    adata.obs["sex"] = adata.obs["sex"].astype(object)
    adata.obs.iloc[:4, adata.obs.columns.get_loc("sex")] = np.nan
    path = tmp_path_factory.mktemp("nan") / "nan.h5ad"
    adata.write_h5ad(path)
    return path


def test_nan_labels_are_dropped_with_a_warning(inputs, labeled, tmp_path, capsys):
    argv = ["run", str(labeled), "--groupby", "sex", *model_args(inputs), "--out", str(tmp_path), "--no-figures",
            "--quiet", "--permutations", "0"]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "attnprof: warning: 4 of 60 cells have no 'sex' label (NaN) and are left out" in captured.err
    assert "profiled 56 cells" in captured.out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--groupby", "sexx"], "obs has no column 'sexx' to group by; did you mean 'sex'?"),
        (["--groupby", "sex", "--subset", "sex == 'female'"], "has 1 group with cells (['female']) within the subset"),
        (["--groupby", "sex", "--compare", "female", "unknown"], "group(s) ['unknown'] have no cells in obs['sex']"),
        (["--groupby", "sex", "--subset", "cell_type == 'pericyte'"], "selects no cells (of 60)"),
    ],
    ids=["missing-column", "one-group", "absent-compare-group", "empty-subset"],
)
def test_bad_cells_input_fails_clearly(inputs, tmp_path, capsys, extra, message):
    assert main(["run", str(inputs["data.h5ad"]), *model_args(inputs), "--out", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnprof: error: ") and message in err


def test_bad_model_input_fails_clearly(inputs, tmp_path, capsys):
    data = str(inputs["data.h5ad"])
    (tmp_path / "ensembl.txt").write_text("ENSMUSG01\nENSMUSG02\n")
    ensembl = str(tmp_path / "ensembl.txt")
    assert main(["run", data, "--groupby", "sex", "--vocab", ensembl, "--out", str(tmp_path)]) == 2
    assert "none of the data's 50 genes" in capsys.readouterr().err

    def run_with(checkpoint):
        argv = ["run", data, "--groupby", "sex", "--model", str(checkpoint), "--vocab", str(inputs["vocab.txt"]),
                "--out", str(tmp_path)]  # fmt: skip
        assert main(argv) == 2
        return capsys.readouterr().err

    bigger = small_nicheformer(80, n_layers=2, d_model=16)
    torch.save({"state_dict": {"model." + k: v for k, v in bigger.state_dict().items()},
                "hyper_parameters": {"nheads": 4}}, tmp_path / "other.ckpt")  # fmt: skip
    assert "has n_tokens=80" in run_with(tmp_path / "other.ckpt")  # the vocabulary does not fit this model

    torch.save({"state_dict": {"bert.encoder.layer.0.attention.self.query.weight": torch.zeros(2, 2)}},
               tmp_path / "bert.ckpt")  # fmt: skip
    assert "is not a Nicheformer checkpoint" in run_with(tmp_path / "bert.ckpt")

    assert main(["run", data, "--groupby", "sex", "--model", str(inputs["model.ckpt"]), "--out", str(tmp_path)]) == 2
    assert "--model needs --vocab" in capsys.readouterr().err


def test_run_without_a_model_profiles_an_untrained_one(inputs, tmp_path, capsys):
    argv = ["run", str(inputs["data.h5ad"]), "--groupby", "sex", "--out", str(tmp_path), "--no-figures", "--quiet",
            "--permutations", "0"]
    assert main(argv) == 0
    assert "no --model: profiling an untrained small Nicheformer" in capsys.readouterr().err
    assert Profile.load(tmp_path / "profile.npz").genes[30:80] == list(ad.read_h5ad(inputs["data.h5ad"]).var_names)


def test_validate_passes_and_fails_beyond_tolerance(inputs, capsys, monkeypatch):
    argv = ["validate", str(inputs["data.h5ad"]), *model_args(inputs), "--groupby", "sex", "--cells", "12",
            "--backend", "torch", "--panel", "Esr1,Ar"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "12 cells" in out and "recv_sum" in out and "pair_sum" in out and "all quantities within tolerance" in out
    monkeypatch.setitem(TOLERANCE, torch.float32, 0.0)  # demand bit-exact sums
    assert main(argv) == 1
    assert "FAILED" in capsys.readouterr().err


def test_plot_redraws_from_the_saved_profile(run_out, tmp_path, capsys):
    assert main(["plot", str(run_out), "--layer", "1", "--head", "2", "--out", str(tmp_path)]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {f"{f}.{e}" for f in FIGURES for e in ("png", "pdf")}
    assert main(["plot", str(run_out), "--layer", "7", "--out", str(tmp_path)]) == 2
    assert "layer 7 is out of range" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "nowhere")]) == 2
    assert "no profile at" in capsys.readouterr().err


def test_console_script_is_declared_and_runs():
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("attnprof") == "attnprof.cli:main"
    done = subprocess.run([sys.executable, "-m", "attnprof.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    for command in ("run", "demo", "validate", "plot"):
        assert command in done.stdout
