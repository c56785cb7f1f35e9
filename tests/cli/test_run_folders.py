"""Trustworthy runs (issue 13), as a user meets them on the command line: a reused --out never mixes runs,
every location and input is checked before the first batch, messages say what is wrong, outputs are
complete and readable by others, and degenerate data says there is nothing to compare."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from attnprof import Profile
from attnprof.cli import main
from attnprof.singlecell.demo import write_demo_inputs

ROOT = Path(__file__).resolve().parents[2]


def cli(*argv, env=None):
    """``attnprof ARGV`` in a fresh process, as a user runs it: (exit status, stdout, stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run([sys.executable, "-m", "attnprof.cli", *map(str, argv)], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    return done.returncode, done.stdout, done.stderr


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path) -> sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_demo_inputs(tmp_path_factory.mktemp("inputs"), n_cells=16, n_genes=30, seed=4)


def run_argv(inputs, out, *extra):
    """A run of the 16 demo cells (8 per group) without permutations (not the point here: kept fast)."""
    return ["run", inputs["data.h5ad"], "--groupby", "sex", "--model", inputs["model.ckpt"], "--vocab",
            inputs["vocab.txt"], "--means", inputs["means.npy"], "--window", "8", "--threads", "1", "--quiet",
            "--permutations", "0", "--out", out, *extra]  # fmt: skip


#: 8 cells per group are below the default --min-cells: runs that must write tables lower it.
FEW = ("--min-cells", "1")


def variant(inputs, tmp_path, name, change) -> Path:
    """A copy of the demo data changed by ``change(adata)``, written to ``tmp_path/name.h5ad``."""
    adata = ad.read_h5ad(inputs["data.h5ad"])
    change(adata)
    path = tmp_path / f"{name}.h5ad"
    adata.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def first_run(inputs, tmp_path_factory):
    """A run with figures into a folder that already holds a file of the user's."""
    out = tmp_path_factory.mktemp("reused")
    (out / "notes.txt").write_text("the user's own notes\n")
    status, stdout, stderr = cli(*run_argv(inputs, out, *FEW))
    assert status == 0, stderr
    return out, stdout


# ------------------------------------------------- 1. a reused --out never mixes runs
def test_a_reused_out_is_refused_then_replaced_without_mixing_runs(inputs, first_run):
    out, _ = first_run
    record = json.loads((out / "run.json").read_text())
    assert "notes.txt" not in record["outputs"]  # never list what this run did not write
    assert set(record["outputs"]) == set(snapshot(out)) - {"notes.txt"}
    assert any(p.startswith("figures/") for p in record["outputs"])
    before = snapshot(out)

    status, _, stderr = cli(*run_argv(inputs, out, *FEW, "--no-figures"))
    assert status == 2
    assert f"--out {out} holds another run (run.json)" in stderr and "--overwrite" in stderr
    assert snapshot(out) == before  # the earlier run is untouched

    status, _, stderr = cli(*run_argv(inputs, out, *FEW, "--no-figures", "--overwrite"))
    assert status == 0, stderr
    record = json.loads((out / "run.json").read_text())
    assert not (out / "figures").exists()  # the replaced run's figures are gone, not passed off as this run's
    assert (out / "notes.txt").read_text() == "the user's own notes\n"  # not attnprof's: stays, unlisted
    assert set(record["outputs"]) == set(snapshot(out)) - {"notes.txt"}
    assert "--no-figures" in record["command"] and not any(p.startswith("figures/") for p in record["outputs"])


# ------------------------------------------- 4. every location and input checked first
def test_locations_are_checked_before_the_first_batch_and_a_failed_run_leaves_no_folder(inputs, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    status, _, stderr = cli(*run_argv(inputs, blocker / "out"))
    assert status == 2 and f"{blocker} is a file, so {blocker / 'out'} cannot be created" in stderr
    assert "profiled" not in stderr and blocker.read_text() == "not a folder\n"

    def fails(argv, message):
        assert main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("attnprof: error: ") and message in err, err

    taken = tmp_path / "taken"
    (taken / "tables").parent.mkdir()
    (taken / "tables").write_text("a file where the tables folder goes\n")
    fails(run_argv(inputs, taken), f"{taken / 'tables'} is a file where attnprof writes its tables folder")
    assert sorted(p.name for p in taken.iterdir()) == ["tables"]

    # an input that fails after the folder was claimed (vocabulary of the wrong size): no folder is left
    short_vocab = tmp_path / "vocab.txt"
    short_vocab.write_text("Esr1\nAr\n")
    fresh = tmp_path / "new" / "deeper" / "out"
    argv = run_argv(inputs, fresh)
    argv[argv.index("--vocab") + 1] = short_vocab
    fails(argv, "has 2 genes, so the model would need")
    assert not (tmp_path / "new").exists()

    # merge: -o must be a new file, not a folder and not one of the inputs; all checked before loading
    status, _, stderr = cli(*run_argv(inputs, tmp_path / "one", *FEW, "--no-figures"))
    assert status == 0, stderr
    profile = tmp_path / "one" / "profile.npz"
    before = profile.read_bytes()
    fails(["merge", profile, "-o", tmp_path / "one"], f"-o {tmp_path / 'one'} is a folder: give a file name")
    fails(["merge", profile, "-o", profile, "--overwrite"], "is also an input: writing it would destroy that input")
    assert profile.read_bytes() == before


# ---------------------------------------------------------------- 5. messages
def test_messages_name_the_problem(inputs, tmp_path, capsys):
    not_h5ad = tmp_path / "counts.csv"
    not_h5ad.write_text("gene,cell1\nEsr1,3\n")
    status, _, stderr = cli("run", not_h5ad, "--groupby", "sex", "--out", tmp_path / "out")
    assert status == 2 and f"data file {not_h5ad} is not an .h5ad file" in stderr
    assert "file signature not found" not in stderr and not (tmp_path / "out").exists()

    garbage = tmp_path / "model.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    argv = [str(a) for a in run_argv(inputs, tmp_path / "out2", "--trust-checkpoint")]
    argv[argv.index("--model") + 1] = str(garbage)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{garbage} is not a readable PyTorch checkpoint" in err and "load it with" not in err
    assert not (tmp_path / "out2").exists()

    rng = np.random.default_rng(0)
    data = variant(inputs, tmp_path, "area", lambda a: a.obs.__setitem__("area", rng.random(a.n_obs) * 100))
    argv = [str(a) for a in run_argv(inputs, tmp_path / "out3")]
    argv[1], argv[argv.index("--groupby") + 1] = str(data), "area"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "has 16 groups (" in err and "... and 10 more" in err
    assert "it looks continuous (16 distinct values)" in err and len(err) < 600
    assert main([*argv, "--compare", "0.5", "1.5"]) == 2  # naming groups of a continuous column: the same
    err = capsys.readouterr().err
    assert "['0.5', '1.5'] have no cells in obs['area']" in err and "it looks continuous" in err and len(err) < 600


# ----------------------------------------------------------------- 6. install
def test_a_plain_install_writes_what_the_readme_promises(first_run):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    plain = " ".join(project["dependencies"])
    assert "pyarrow" in plain and "ninja" in plain  # Parquet and the kernel build need no extra
    out, stdout = first_run
    assert "tables/ (csv, h5ad, parquet)" in stdout
    assert {f"tables/{t}.parquet" for t in ("heads", "layers", "genes", "pairs", "summaries")} <= set(snapshot(out))
    modes = {p: stat.S_IMODE((out / p).stat().st_mode) for p in snapshot(out) if p != "notes.txt"}
    assert set(modes.values()) == {0o666 & ~_umask()}, modes  # profile.npz like every other output


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_the_first_build_says_so_and_no_compiler_falls_back(tmp_path):
    """No C++ compiler (CXX is a program that fails): one line announces the build, a warning names the
    failure, and the eager path gives the result."""
    code = ("import torch; from attnprof.kernels import fused_rows;"
            "print('built' if fused_rows.available() else 'fallback')")  # fmt: skip
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "CXX": "false", "CC": "false",
           "ATTNPROF_FUSED": "1"}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("attnprof: building the fused CPU kernel (first use in this environment), about 40 s") == 1
    assert "the fused CPU row kernel could not be built" in done.stderr and done.stdout.strip() == "fallback"


# -------------------------------------------------------------- 7. degenerate data
def test_degenerate_data_says_there_is_nothing_to_compare(inputs, tmp_path, capsys):
    zero = variant(inputs, tmp_path, "zero", lambda a: setattr(a, "X", sp.csr_matrix(a.X.shape, dtype=np.float32)))
    out = tmp_path / "zero-run"
    argv = run_argv(inputs, out)  # default --min-cells, which 8 cells per group miss: the data's fault comes first
    argv[1] = zero
    status, _, stderr = cli(*argv)
    assert status == 1 and "fewer than --min-cells" not in stderr
    assert "nothing to compare: every one of the 16 cells has zero counts in the vocabulary genes" in stderr
    assert sorted(snapshot(out)) == ["profile.npz", "run.json"]  # no NaN tables, no empty figures
    assert json.loads((out / "run.json").read_text())["outputs"] == ["profile.npz", "run.json"]
    assert Profile.load(out / "profile.npz").cells == {"female": 8, "male": 8}  # still mergeable

    out = tmp_path / "few"
    assert main([str(a) for a in run_argv(inputs, out, "--min-cells", "9", "--no-figures")]) == 1
    err = capsys.readouterr().err
    assert "nothing to compare: female has 8 and male has 8 cells, fewer than --min-cells 9" in err
    assert sorted(snapshot(out)) == ["profile.npz", "run.json"]
    assert main(["plot", str(out), "--min-cells", "9"]) == 2
    assert "nothing to compare" in capsys.readouterr().err and not (out / "figures").exists()
