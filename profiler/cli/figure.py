"""``attnprof figure OUT``: panels A–G of the Nicheformer paper's Extended Data Fig. 4 from a run's profile.npz
(:mod:`attnprof.figure`; the files: :mod:`attnprof.figure_files`; docs/figure.md)."""

from __future__ import annotations

import sys
from pathlib import Path

from ..checks import nothing_to_compare
from ..figure import figure_panels
from ..figure_files import check_targets, outputs, write_figure
from ..outputs import list_outputs
from ..profile import Profile
from ..summary import saved_contrast
from .common import layer_heads, profile_path


def cmd_figure(args) -> int:
    path = profile_path(args.run)
    out = Path(args.out) if args.out else path.parent / "figure"
    options = dict(head_a=_head(args.head_a, "--head-a"), head_b=_head(args.head_b, "--head-b"),
                   gallery=layer_heads(args.gallery), within=_within(args.within))  # fmt: skip
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


def _head(value: str | None, option: str) -> tuple[int, int] | None:
    if value is None:
        return None
    pairs = layer_heads(value, option)
    if len(pairs) != 1:
        raise ValueError(f"{option} takes one layer:head (0-based), e.g. 0:1; got {value!r}")
    return pairs[0]


def _within(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    key, sep, level = value.partition("=")
    if not sep or not key.strip() or not level.strip():
        raise ValueError(f"--within takes KEY=VALUE, e.g. cell_type='HY GABA' (quote spaces); got {value!r}")
    return key.strip(), level.strip()
