"""The files of ``attnprof figure OUT`` (the command: :mod:`attnprof.cli.figure`; the panels: :mod:`attnprof.figure`).

Writes, into ``OUT/figure/`` (or ``--out``): ``figure.png`` (every panel; also ``figure.pdf`` with ``--pdf``),
``panel_<X>.png`` (each panel alone, with its caption), ``panel_<X>.csv`` (its numbers, tidy),
``panel_<X>_heads.csv`` (every head's numbers behind its choice or its marks), ``captions.md`` (how each panel
was made and chosen) and the manifest ``figure.json``. Files are written beside the folder and moved in when
complete. A file in the way that no attnprof manifest lists (``figure.json`` here, the run's ``run.json``) is a
user's: refused unless ``--overwrite``. An empty panel's CSVs hold one row saying what is missing.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from .figure_maps import Panel
from .outputs import MANIFEST as RUN_MANIFEST

MANIFEST = "figure.json"


def outputs(formats=("png",)) -> list[str]:
    """The files a figure folder holds (the manifest last)."""
    names = [f"figure.{f}" for f in formats] + ["captions.md"]
    for p in "ABCDEFG":
        names += [f"panel_{p}.png", f"panel_{p}.csv"]
    names += ["panel_AB_heads.csv", "panel_C_heads.csv"] + [f"panel_{p}_heads.csv" for p in "DEFG"]
    return names + [MANIFEST]


def check_targets(out: Path, names, overwrite: bool, run: Path) -> None:
    """Refuse, before any work, to write over a file no attnprof manifest lists (unless ``overwrite``)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a folder for the figure")
    ours = _listed(out / MANIFEST, out) | _listed(run / RUN_MANIFEST, run)
    taken = [n for n in names if (out / n).exists() and (out / n).resolve() not in ours]
    if taken and not overwrite:
        raise ValueError(f"{out} holds {taken[0]}{f' and {len(taken) - 1} more' if len(taken) > 1 else ''} that no "
                         f"attnprof manifest lists: move them away, give another --out, or add --overwrite to "
                         f"replace them")  # fmt: skip


def _listed(manifest: Path, root: Path) -> set[Path]:
    if not manifest.is_file():
        return set()
    try:
        return {(root / str(p)).resolve() for p in json.loads(manifest.read_text())["outputs"]}
    except (ValueError, KeyError, TypeError):
        return set()  # not an attnprof manifest: nothing in it counts as ours


def write_figure(panels: dict[str, Panel], out: Path, *, command=(), title: str = "", formats=("png",),
                 dpi: int = 150) -> list[Path]:  # fmt: skip
    """Write every file of :func:`outputs` into ``out`` (beside it first, then moved in); returns their paths."""
    from .figure_draw import draw_figure, panel_figure

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.absolute().parent, prefix=f".{out.name}.partial-"))
    try:
        fig = draw_figure(panels, title)
        for fmt in formats:
            fig.savefig(tmp / f"figure.{fmt}", dpi=dpi)  # constrained layout: nothing sticks out
        for name, panel in panels.items():
            panel_figure(panel).savefig(tmp / f"panel_{name}.png", dpi=dpi, bbox_inches="tight")
            missing = pd.DataFrame({"panel": [name], "missing": [panel.missing]})  # said, never left out
            (missing if panel.missing else panel.table).to_csv(tmp / f"panel_{name}.csv", index=False)
            target = tmp / f"panel_{'AB' if name in 'AB' else name}_heads.csv"
            if not target.exists():
                (missing if panel.missing else panel.extra["heads"]).to_csv(target, index=False)
        (tmp / "captions.md").write_text(captions(panels, title))
        files = sorted(p.name for p in tmp.iterdir())
        previous = _listed(out / MANIFEST, out)
        for name in files:
            os.replace(tmp / name, out / name)
        for stale in previous - {(out / n).resolve() for n in files} - {(out / MANIFEST).resolve()}:
            if stale.is_file() and out.resolve() in stale.parents:  # a previous figure's file no longer made
                stale.unlink()
        record = {"command": list(command), "panels": {n: {"title": p.title, "caption": p.caption,
                  "missing": p.missing} for n, p in panels.items()}, "outputs": [*files, MANIFEST]}  # fmt: skip
        (out / f".{MANIFEST}.tmp").write_text(json.dumps(record, indent=2) + "\n")
        os.replace(out / f".{MANIFEST}.tmp", out / MANIFEST)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [out / n for n in [*files, MANIFEST]]


def captions(panels: dict[str, Panel], title: str) -> str:
    lines = [f"# {title}", ""]
    for name, panel in panels.items():
        lines += [f"## Panel {name}: {panel.title}", ""]
        lines += [f"**Empty**: {panel.missing}" if panel.missing else panel.caption, ""]
    return "\n".join(lines)
