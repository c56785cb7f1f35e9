"""What a run, merge or report prints and records about its comparison: the layer summary, the design
(unit of replication, permutations) and the contrast a saved profile names."""

from __future__ import annotations

from .profile import Profile
from .tables import DEFAULT_MIN_CELLS


def design_record(comparison, profile: Profile) -> dict:
    """What run.json says about the unit of replication and the permutation null."""
    if comparison is None:
        unit = "cell" if profile.blocks.pseudo else "replicate"
        return {"unit": unit, "design": None, "permutations": 0, "exact": False, "min_p": None}
    return {"unit": comparison.unit, "design": comparison.design(), "permutations": comparison.permutations,
            "exact": comparison.exact, "min_p": comparison.min_p}  # fmt: skip


def saved_contrast(profile: Profile, compare, min_cells) -> tuple[str, str, int]:
    """Groups A, B and min_cells: as given, else the profile's saved contrast, else its two groups."""
    contrast = profile.meta.get("contrast", {})
    a, b = compare or (contrast.get("a"), contrast.get("b"))
    if a is None:
        if len(profile.groups) != 2:
            raise ValueError(f"the profile has groups {profile.groups}: name the two to compare with --compare A B")
        a, b = profile.groups
    return a, b, min_cells if min_cells is not None else contrast.get("min_cells", DEFAULT_MIN_CELLS)


def layer_summary(comparison, profile: Profile, headline: str | None = None) -> str:
    """The layer table as a few lines: mean over heads and max over heads (head) per family.

    headline: the first line (default: cells profiled, time and backend).
    """
    if headline is None:
        cells = ", ".join(f"{g} {n}" for g, n in profile.cells.items())
        elapsed = profile.meta.get("elapsed_s") or float("nan")
        total = sum(profile.cells.values())
        resumed = int(profile.meta.get("resumed_cells", 0))
        rate = (total - resumed) / elapsed if elapsed > 0 else float("nan")  # the time is this run's only
        backend = profile.meta.get("backend_used", profile.meta.get("backend"))
        if resumed:
            headline = (
                f"profiled {total - resumed} cells in {elapsed:.1f} s ({rate:.0f} cells/s) and {resumed} from the "
                f"checkpoint: {total} cells ({cells}), backend {backend}"
            )
        else:
            headline = f"profiled {total} cells ({cells}) in {elapsed:.1f} s ({rate:.0f} cells/s), backend {backend}"
    lines = [
        headline,
        comparison.design(),
        f"attention difference per layer, {comparison.a} − {comparison.b}: mean over heads / max over heads (head)",
    ]
    table = comparison.layers
    families = list(dict.fromkeys(table["family"]))
    header = "layer  " + "".join(f"{f:>28}" for f in families)
    lines.append(header)
    permuted = "mean_abs_diff_null_q95" in table

    def mark(r, stat) -> str:  # above the permutation null's 95th percentile
        return "*" if permuted and r[stat] > r[f"{stat}_null_q95"] else " "

    for layer, rows in table.groupby("layer", sort=True):
        by_family = rows.set_index("family")
        cells_txt = []
        for f in families:
            r = by_family.loc[f]
            mean = f"{r['mean_abs_diff']:.3g}{mark(r, 'mean_abs_diff')}"
            top = f"{r['max_abs_diff']:.3g}{mark(r, 'max_abs_diff')}"
            cells_txt.append(f"{mean:>11}/ {top:<9}({int(r['max_head']):>2})")
        lines.append(f"{layer:>5}  " + "".join(f"{c:>28}" for c in cells_txt))
    if permuted:
        lines.append(f"* above its permutation null's 95th percentile ({comparison.permutations} relabelings of whole "
                     f"{'replicates' if comparison.unit == 'replicate' else 'pseudo-replicate blocks'}); null bands, "
                     f"p_perm and family-wise p_fwer: tables/layers.csv, tables/heads.csv, report.html")  # fmt: skip
    else:
        lines.append("noise floors (the |difference| expected by chance): tables/layers.csv, report.html")
    return "\n".join(lines)
