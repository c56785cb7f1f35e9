"""benches/gpu_check.py's CPU side: argument handling, the plan of measurements, and each contender's
closure run once on tiny shapes under the interpreter (the timing itself needs a GPU)."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest
import torch

from test_triton import pytestmark  # noqa: F401

ROOT = Path(__file__).parents[2]


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benches" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_arguments_and_plan(capsys):
    g = gpu_check()
    a = g.parse([])
    assert (a.dtypes, a.head_dims, a.shapes, a.precision, a.layers) == (["fp16", "bf16", "fp32"], [32, 64],
                                                                          ["full", "panel"], "tf32x3", 12)  # fmt: skip
    assert len(g.plan(a)) == 3 * 2 * 2 * (len(g.CONTENDERS) + 1)
    assert g.main(["--dry-run", "--dtypes", "fp32", "--head-dims", "64", "--shapes", "panel", "--layers", "0"]) == 0
    assert "6 measurements" in capsys.readouterr().out
    for bad in (["--dtypes", "fp8"], ["--head-dims", "48"], ["--shapes", "tiny"], ["--precision", "tf16"]):
        with pytest.raises(SystemExit):
            g.parse(bad)
    if not torch.cuda.is_available():
        assert g.main([]) == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_every_contender_runs(dtype):
    g = gpu_check()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    d = g.workload((2, 60, 55, 60), 32, dtype, device=device, width=64)
    for what in g.CONTENDERS:
        if what.startswith("sdpa") and dtype == torch.float16 and device == "cpu":
            continue
        g.make(what, d)()


def test_shell_script_is_valid_bash():
    run = subprocess.run(["bash", "-n", str(ROOT / "benches" / "gpu_check.sh")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
