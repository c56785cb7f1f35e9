"""What an install holds and needs: the C++ sources ship as package data; Triton is an extra (``attnprof[gpu]``).

"Without Triton" is simulated in a subprocess where ``import triton`` fails (``sys.modules["triton"] = None``),
as in an environment that never installed it. The same check in a real venv without Triton
(``pip install -e .``, then ``attnprof demo``) is described in docs/kernels.md.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib import resources
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NO_TRITON = "import sys; sys.modules['triton'] = None  # import triton raises ImportError, as if not installed\n"


def python(code: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_TRITON + code, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)  # fmt: skip


def test_triton_is_the_gpu_extra_not_a_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(dep.startswith("triton") for dep in project["dependencies"])
    assert project["optional-dependencies"]["gpu"] == ["triton>=3.0"]


def test_without_triton_the_cpu_package_works_and_the_triton_backend_says_how_to_install_it():
    code = """
import torch
import attnprof
from attnprof.kernels import MissingExtra, StatsSpec, attention_stats, resolve_backend, triton_available
assert not triton_available()
q, k, v = (torch.randn(2, 2, 5, 4, generator=torch.Generator().manual_seed(i)) for i in range(3))
spec = StatsSpec(n_groups=2, window=4)
out, sums = attention_stats(q, k, v, spec=spec, groups=[0, 1], backend="torch")
ref, _ = attention_stats(q, k, v, spec=spec, groups=[0, 1], backend="reference")
torch.testing.assert_close(out, ref)
assert resolve_backend("auto", torch.device("cpu")) == "torch"
try:
    attention_stats(q, k, v, spec=spec, groups=[0, 1], backend="triton")
except MissingExtra as e:
    assert isinstance(e, ValueError) and isinstance(e, ImportError)
    print(e)
"""
    done = python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        'the triton backend needs Triton, which is not installed here: pip install "attnprof[gpu]" '
        '(or choose backend="torch")'
    )


@pytest.mark.slow
def test_without_triton_the_demo_runs(tmp_path):
    """The README's first command on a CPU install without Triton (about 30 s)."""
    done = python("from attnprof.cli import main; sys.exit(main(sys.argv[1:]))", "demo", "--out",
                  str(tmp_path / "demo"), "--quiet")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "demo" / "report.html").is_file() and (tmp_path / "demo" / "profile.npz").is_file()


def test_the_kernel_sources_are_package_data():
    """Found through importlib.resources from this (editable) install, and shipped in a wheel."""
    from attnprof.kernels import fused_rows

    here = resources.files("attnprof.kernels")
    assert all(here.joinpath(name).is_file() for name in fused_rows.SOURCES)
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "*.cpp" in package_data["attnprof.kernels"]


def test_a_wheel_ships_the_kernel_sources(tmp_path):
    """A regular (non-editable) install: the wheel holds every C++ source beside fused_rows.py."""
    from attnprof.kernels import fused_rows

    src = tmp_path / "src"  # a copy: the build leaves build/ and *.egg-info in the tree it builds
    src.mkdir()
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / part, src / part)
    for part in ("kernels", "profiler"):
        shutil.copytree(ROOT / part, src / part, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(src)], check=True, timeout=300, capture_output=True)  # fmt: skip
    (wheel,) = tmp_path.glob("attnprof-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"attnprof/kernels/{name}" for name in fused_rows.SOURCES} | {"attnprof/kernels/fused_rows.py"} <= names
