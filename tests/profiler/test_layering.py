"""The layering of DESIGN.md, checked by import-linter's contracts in pyproject.toml ([tool.importlinter]).

attnprof.kernels lives in kernels/, outside profiler/ (pyproject maps both into one package), and grimp scans one
directory per root package: the check runs on a staged copy that puts kernels/ at attnprof/kernels/, in a
subprocess whose ``attnprof`` is that copy. Run it by hand with ``python tests/test_layering.py``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("importlinter", reason="the layering check needs import-linter (the test extra)")

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = ROOT / "pyproject.toml"
CONTRACTS = (
    "kernels import nothing of the profiler",
    "core imports no single-cell front end and no command line",
    "statistics import no torch",
    "no import cycles between the modules of a package",
    "model families are independent of each other",
)
LINT = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True, no_logo=True))"  # noqa: E501


def stage(folder: Path) -> Path:
    """The installed package's layout: profiler/ as attnprof/, kernels/ as attnprof/kernels/."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "profiler", folder / "attnprof", ignore=ignore)
    shutil.copytree(ROOT / "kernels", folder / "attnprof" / "kernels", ignore=ignore)
    return folder / "attnprof"


def lint(staged: Path, config: Path = PYPROJECT) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(staged.parent), "PYTHONNOUSERSITE": "1"}
    return subprocess.run([sys.executable, "-c", LINT, str(config)], cwd=staged.parent, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def plant(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n{line}  # planted\n")


def test_the_contracts_hold(tmp_path):
    done = lint(stage(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    for name in CONTRACTS:
        assert f"{name} KEPT" in done.stdout
    assert f"Contracts: {len(CONTRACTS)} kept, 0 broken." in done.stdout


@pytest.mark.parametrize(
    "where, line, broken",
    [
        ("kernels/spec.py", "from attnprof import tables", CONTRACTS[0]),
        ("kernels/reduce.py", "import attnprof.singlecell.demo", CONTRACTS[0]),
        ("profile.py", "from attnprof.cli import main", CONTRACTS[1]),
        ("adapters/__init__.py", "import attnprof.singlecell", CONTRACTS[1]),
        ("statistics/null.py", "import torch", CONTRACTS[2]),
        ("statistics/welch.py", "from attnprof.kernels import SUMMARIES", CONTRACTS[2]),  # torch through the kernels
        ("statistics/effects.py", "import pandas", CONTRACTS[2]),
        ("tables.py", "import attnprof.cli", CONTRACTS[3]),  # cli imports tables: a cycle
        ("singlecell/geneformer/front.py", "from attnprof.singlecell.scgpt import ScGPT", CONTRACTS[4]),
        ("singlecell/nicheformer/tokenizer.py", "import attnprof.singlecell.geneformer.tokenizer", CONTRACTS[4]),
    ],
)  # fmt: skip
def test_a_planted_violation_fails_the_check(tmp_path, where, line, broken):
    staged = stage(tmp_path)
    plant(staged / where, line)
    done = lint(staged)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"{broken} BROKEN" in done.stdout  # (a planted import into the kernels makes a cycle too)


if __name__ == "__main__":  # python tests/test_layering.py: the check on this checkout, with import-linter's report
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        done = lint(stage(Path(tmp)))
        print(done.stdout, done.stderr, sep="")
        sys.exit(done.returncode)


def test_the_top_level_package_loads_the_core_only():
    """``import attnprof`` loads no front end and no command line; their names still resolve on first use."""
    code = ("import sys, attnprof; assert not any(m.startswith(('attnprof.singlecell', 'attnprof.cli')) "
            "for m in sys.modules), sorted(sys.modules); from attnprof import profile_anndata, Nicheformer; "
            "assert profile_anndata.__module__ == 'attnprof.singlecell.run'")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
