"""``attnprof plot``: redraw the figures of a run folder from its profile."""

from __future__ import annotations

from pathlib import Path

from ..checks import nothing_to_compare
from ..outputs import list_outputs
from ..profile import Profile
from ..summary import saved_contrast
from .common import layer_heads, profile_path


def cmd_plot(args) -> int:
    from ..plots import save_figures

    path = profile_path(args.run)
    profile = Profile.load(path)
    a, b, min_cells = saved_contrast(profile, args.compare, args.min_cells)
    empty = nothing_to_compare(profile, a, b, min_cells)
    if empty:
        raise ValueError(f"{empty}: no figures to draw")
    saved = profile.meta.get("contrast", {})
    comparison = profile.compare(a, b, min_cells=min_cells, permutations=saved.get("permutations"),
                                 seed=saved.get("seed", 0))  # fmt: skip
    out = Path(args.out) if args.out else path.parent / "figures"
    groups = profile.groups if args.groups == ["all"] else args.groups
    for g in groups or []:
        profile.group_index(g)  # an unknown group fails before drawing
    written = save_figures(profile, comparison, out, layer=args.layer, head=args.head, groups=groups,
                           gallery=layer_heads(args.gallery), gallery_group=args.gallery_group)  # fmt: skip
    list_outputs(path.parent, written)  # figures drawn into a run folder are that run's outputs
    for path in written:
        print(path)
    return 0
