"""``attnprof figure OUT``: panels A–G of the Nicheformer paper's Extended Data Fig. 4 from a run's profile.npz.

Writes, into ``OUT/figure/`` (or ``--out``): ``figure.png`` (every panel; also ``figure.pdf`` with ``--pdf``), ``panel_<X>.png``
(each panel alone, with its caption), ``panel_<X>.csv`` (its numbers, tidy), ``panel_<X>_heads.csv`` (every
head's numbers behind its choice or its marks), ``captions.md`` (how each panel was made and chosen) and the
manifest ``figure.json``. Files are written beside the folder and moved in when complete. A file in the way
that no attnprof manifest lists (``figure.json`` here, the run's ``run.json``) is a user's: refused unless
``--overwrite``. A panel whose input the profile lacks is drawn as a labelled empty panel and said on stderr.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pandas as pd

from .figure import figure_panels
from .figure_maps import Panel
from .outputs import MANIFEST as RUN_MANIFEST, list_outputs

MANIFEST = "figure.json"


def make_figure(path: Path, args) -> int:
    """The command: ``path`` is the profile .npz; ``args`` the parsed options of ``attnprof figure``."""
    from .checks import nothing_to_compare
    from .profile import Profile
    from .summary import saved_contrast

    out = Path(args.out) if args.out else path.parent / "figure"
    options = dict(head_a=_head(args.head_a, "--head-a"), head_b=_head(args.head_b, "--head-b"),
                   gallery=_heads(args.gallery), within=_within(args.within))  # fmt: skip
    formats = ("png", "pdf") if args.pdf else ("png",)
    names = outputs(formats)
    check_targets(out, names, args.overwrite, path.parent)  # before any work
    profile = Profile.load(path)
    a, b, min_cells = saved_contrast(profile, args.compare, args.min_cells)
    empty = nothing_to_compare(profile, a, b, min_cells)
    if empty:
        raise ValueError(f"{empty}: no figure to draw")
    saved = profile.meta.get("contrast", {})  # the run's permutations and seed: its p-values
    panels = figure_panels(profile, a, b, maps_by=args.maps_by, gallery_group=args.gallery_group,
                           gene_set=args.gene_set, min_cells=min_cells, permutations=saved.get("permutations"),
                           seed=saved.get("seed", 0), **options)  # fmt: skip
    if "map_sum" not in profile.sums:
        print(f"attnprof: figure: panels A-C show the first {profile.window} positions (the run kept no whole-context "
              f"maps: attnprof run --map-bins N keeps them)", file=sys.stderr)  # fmt: skip
    for panel in panels.values():
        if panel.missing:
            print(f"attnprof: figure: panel {panel.name} is drawn empty: {panel.missing}", file=sys.stderr)
    command = ["attnprof", *(sys.argv[1:] if args.argv is None else args.argv)]
    title = f"attnprof: {a} − {b}, from {path} (layer/head: attnprof's 0-based numbers; the paper's 1-based in brackets)"
    written = write_figure(panels, out, command=command, title=title, formats=formats)
    list_outputs(path.parent, written)  # inside the run folder: that run's outputs (replaced by --overwrite)
    empty = [p.name for p in panels.values() if p.missing]
    print(f"wrote {out}/: {', '.join(f'figure.{f}' for f in formats)}, panel_A..G (png, csv), captions.md"
          + (f"; panels {', '.join(empty)} empty (see above)" if empty else ""))  # fmt: skip
    return 0


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


def _head(value: str | None, option: str) -> tuple[int, int] | None:
    if value is None:
        return None
    pairs = _heads(value, option)
    if len(pairs) != 1:
        raise ValueError(f"{option} takes one layer:head (0-based), e.g. 0:1; got {value!r}")
    return pairs[0]


def _heads(value: str | None, option: str = "--gallery") -> list[tuple[int, int]] | None:
    """``L:H,L:H`` as [(L, H), ...] (attnprof's 0-based numbers)."""
    if value is None:
        return None
    try:
        pairs = [tuple(int(x) for x in item.split(":")) for item in value.split(",") if item.strip()]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 for p in pairs):
        example = "0:1" if option != "--gallery" else "0:1,3:2"
        raise ValueError(f"{option} takes layer:head (0-based, as attnprof's tables){' pairs separated by commas' if option == '--gallery' else ''}, "
                         f"e.g. {example}; got {value!r}")  # fmt: skip
    return pairs


def _within(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    key, sep, level = value.partition("=")
    if not sep or not key.strip() or not level.strip():
        raise ValueError(f"--within takes KEY=VALUE, e.g. cell_type='HY GABA' (quote spaces); got {value!r}")
    return key.strip(), level.strip()
