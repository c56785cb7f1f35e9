"""Bench options and the side-by-side report.

Quick mode (the default, run in CI so the benches never rot) shrinks every
shape; ``--full`` uses the real ones and writes ``--report`` (JSON + Markdown)
with each contender's time and its ratio to the group's baseline, all from one
pytest session on one machine.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", help="bench at the real sizes (slow)")
    parser.addoption("--report", default=None, help="write <path>.json and <path>.md with the ratios")


@pytest.fixture(scope="session")
def full(request) -> bool:
    return request.config.getoption("--full")


def pytest_configure(config):
    torch.set_num_threads(torch.get_num_threads())


def pytest_sessionfinish(session, exitstatus):
    path = session.config.getoption("--report")
    bs = getattr(session.config, "_benchmarksession", None)
    if not path or bs is None or not bs.benchmarks:
        return
    rows = []
    for bench in bs.benchmarks:
        info = bench.extra_info
        rows.append(
            {
                "group": bench.group,
                "name": info.get("contender", bench.name),
                "min_s": bench.stats.min,
                "median_s": bench.stats.median,
                "rounds": bench.stats.rounds,
                **info,
            }
        )
    for group in {r["group"] for r in rows}:
        members = [r for r in rows if r["group"] == group]
        # the baseline is the fastest contender marked as one (e.g. the faster of two plain paths)
        # min over rounds: the least disturbed run of each contender on a noisy machine
        base = min((r for r in members if r.get("baseline")), key=lambda r: r["min_s"], default=None)
        for r in members:
            r["ratio_to_baseline"] = r["min_s"] / base["min_s"] if base else None
    machine = {
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "full": session.config.getoption("--full"),
    }
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"machine": machine, "results": rows}, indent=2))
    lines = [f"Machine: {machine}", ""]
    for group in sorted({r["group"] for r in rows}):
        lines += [f"### {group}", "", "| contender | min (s) | median (s) | x baseline (min) | extra |", "|---|---|---|---|---|"]
        for r in sorted((r for r in rows if r["group"] == group), key=lambda r: r["min_s"]):
            extra = ", ".join(f"{k}={v}" for k, v in r.items() if k not in {
                "group", "name", "min_s", "median_s", "rounds", "ratio_to_baseline", "baseline", "contender"})  # fmt: skip
            ratio = "" if r["ratio_to_baseline"] is None else f"{r['ratio_to_baseline']:.2f}"
            lines.append(f"| {r['name']} | {r['min_s']:.4f} | {r['median_s']:.4f} | {ratio} | {extra} |")
        lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines))
