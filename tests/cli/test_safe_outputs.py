"""Runs that never lose work and never touch a user's file (issue 22, items 2, 3 and 6), through the CLI:
the report template found from any working directory, outputs moved in only when complete (profile.npz
first), `attnprof report OUT` rebuilding the rest, foreign files refused, SIGTERM like SIGINT, and every
printed warning kept in run.json and report.html."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from attnprof.cli import main
from attnprof.singlecell.demo import write_demo_inputs


def cli(*argv, cwd=None, env=None):
    """``python -m attnprof.cli ARGV`` in a fresh process (the README's torchrun form): (status, stdout, stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run([sys.executable, "-m", "attnprof.cli", *map(str, argv)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    return done.returncode, done.stdout, done.stderr


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_demo_inputs(tmp_path_factory.mktemp("inputs"), n_cells=16, n_genes=30, seed=4)


def run_argv(inputs, out, *extra):
    return ["run", inputs["data.h5ad"], "--groupby", "sex", "--model", inputs["model.ckpt"], "--vocab",
            inputs["vocab.txt"], "--means", inputs["means.npy"], "--window", "8", "--threads", "1", "--quiet",
            "--permutations", "0", "--min-cells", "1", "--out", out, *extra]  # fmt: skip


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def no_temporary_folders(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".partial-" in p.name]


def test_the_torchrun_command_works_from_the_folder_holding_the_clone(inputs, tmp_path):
    """The README's `torchrun -m attnprof.cli run` from a folder that holds a directory named attnprof (the
    clone; here with a templates folder too): the name resolves to that folder as a namespace package."""
    (tmp_path / "attnprof" / "templates").mkdir(parents=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                "-m", "attnprof.cli"]  # fmt: skip
    done = subprocess.run([*torchrun, *map(str, run_argv(inputs, tmp_path / "out", "--no-figures"))], cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["complete"] is True and "report.html" in record["outputs"]
    assert "<html" in (tmp_path / "out" / "report.html").read_text()


def test_a_failure_after_profiling_keeps_the_profile_and_report_rebuilds_the_rest(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    # matplotlib refuses a bad backend when the figures are drawn: a failure after the profile is written
    status, _, stderr = cli(*run_argv(inputs, out), env={"MPLBACKEND": "bogus"})
    assert status == 2 and "attnprof: error: " in stderr and "backend" in stderr
    assert f"`attnprof report {out}`" in stderr
    assert files(out) == {"profile.npz", "run.json"}  # the expensive part is kept, nothing half-written
    record = json.loads((out / "run.json").read_text())
    assert record["complete"] is False and record["outputs"] == ["profile.npz", "run.json"]
    assert no_temporary_folders(tmp_path)

    assert main([str(a) for a in run_argv(inputs, out)]) == 2  # a rerun names the way out, profiles nothing
    assert f"attnprof report {out}" in capsys.readouterr().err

    assert main(["report", str(out), "--no-figures"]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["complete"] is True and record["command"][:2] == ["attnprof", "run"]  # the run's own command
    assert set(record["outputs"]) == files(out)
    assert {"report.html", "tables/layers.csv"} <= files(out)
    assert no_temporary_folders(tmp_path)


def test_a_users_file_where_tables_go_is_refused_then_replaced_only_with_overwrite(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "tables").mkdir(parents=True)
    (out / "tables" / "genes.csv").write_text("the user's genes\n")
    (out / "notes.txt").write_text("the user's notes\n")
    assert main([str(a) for a in run_argv(inputs, out, "--no-figures")]) == 2
    err = capsys.readouterr().err
    assert f"--out {out} holds files of no listed run (tables/genes.csv)" in err and "--overwrite" in err
    assert files(out) == {"tables/genes.csv", "notes.txt"}  # nothing written, nothing adopted
    assert (out / "tables" / "genes.csv").read_text() == "the user's genes\n"

    assert main([str(a) for a in run_argv(inputs, out, "--no-figures", "--overwrite")]) == 0
    record = json.loads((out / "run.json").read_text())
    assert "tables/genes.csv" in record["outputs"]  # replaced by this run, named by --overwrite: its own now
    assert "notes.txt" not in record["outputs"] and (out / "notes.txt").read_text() == "the user's notes\n"
    assert set(record["outputs"]) == files(out) - {"notes.txt"}


def test_report_refuses_a_file_no_run_lists(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(a) for a in run_argv(inputs, out, "--no-figures")]) == 0
    (out / "figures").mkdir()
    (out / "figures" / "mine.png").write_bytes(b"the user's figure")
    assert main(["report", str(out), "--no-figures"]) == 2
    assert "figures/mine.png" in capsys.readouterr().err
    assert (out / "figures" / "mine.png").read_bytes() == b"the user's figure"


def test_sigterm_is_handled_like_sigint(inputs, tmp_path):
    """Killed while profiling: exit 143, a message, and no folder or temporary folder left behind."""
    big = write_demo_inputs(tmp_path / "big", n_cells=4000, n_genes=30, seed=4)
    out = tmp_path / "out"
    argv = [a for a in run_argv(big, out) if a != "--quiet"]  # the progress bar says when profiling started
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "attnprof.cli", *map(str, argv), "--batch-size", "4"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    seen = ""
    while "profiling" not in seen:
        char = proc.stderr.read(1)
        assert char, f"the run ended before profiling: {seen}"
        seen += char
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, seen + stderr
    assert "attnprof: interrupted (SIGTERM)" in stderr and "Traceback" not in stderr
    assert not out.exists() and no_temporary_folders(tmp_path)


def test_every_printed_warning_is_in_run_json_and_the_report(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [str(a) for a in run_argv(inputs, out, "--no-figures")]
    model = argv.index("--model")
    del argv[model : model + 2]  # no --model: the untrained model's warning
    vocab = argv.index("--vocab")
    del argv[vocab : vocab + 4]  # the data's own genes, no means
    assert main(argv) == 0
    printed = [line.removeprefix("attnprof: warning: ") for line in capsys.readouterr().err.splitlines()
               if line.startswith("attnprof: warning: ")]  # fmt: skip
    assert any("untrained small Nicheformer" in w for w in printed)
    assert json.loads((out / "run.json").read_text())["warnings"] == printed
    report = (out / "report.html").read_text()
    assert 'id="warnings"' in report and "untrained small Nicheformer" in report


def test_figures_plot_draws_into_a_run_folder_stay_that_runs(inputs, tmp_path):
    out = tmp_path / "out"
    assert main([str(a) for a in run_argv(inputs, out, "--no-figures")]) == 0
    assert main(["plot", str(out), "--gallery", "0:1", "--min-cells", "1"]) == 0
    record = json.loads((out / "run.json").read_text())
    assert "figures/head_gallery.png" in record["outputs"] and set(record["outputs"]) == files(out)
    assert main(["report", str(out), "--no-figures"]) == 0  # attnprof's own figures: no --overwrite needed


def test_demo_never_writes_over_a_users_file(tmp_path, capsys):
    mine = tmp_path / "demo" / "inputs" / "data.h5ad"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"the user's data")
    assert main(["demo", "--out", str(tmp_path / "demo"), "--cells", "8", "--quiet"]) == 2
    assert f"{mine} exists where the demo writes its inputs" in capsys.readouterr().err
    assert mine.read_bytes() == b"the user's data" and files(tmp_path / "demo") == {"inputs/data.h5ad"}
