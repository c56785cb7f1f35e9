"""A run's folder: the profile, the tables, the figures and the report, for one contrast."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..profile import Profile


def write_outputs(
    profile: Profile, a, b, out, *, min_cells: int | None = None, permutations: int | None = None,
    seed: int = 0, figures: bool = True, command: Sequence[str] | None = None, within=None, by: str | None = None,
    save_profile: bool = True,
) -> dict:
    """Write a run's folder: ``profile.npz``, ``tables/`` (CSV, Parquet, genes.h5ad), ``figures/`` and
    ``report.html`` (one self-contained page: settings, top findings, figures, links to the tables).

    min_cells: cells per group an element needs (default ``attnprof.tables.DEFAULT_MIN_CELLS``).
    permutations: relabelings of whole blocks for the permutation null (default
               ``attnprof.tables.DEFAULT_PERMUTATIONS``; 0: none).
    within, by: compare within a subset, and groups of another kept key (see :class:`attnprof.Comparison`).
    save_profile: write ``profile.npz`` (``attnprof compare`` writes beside a run's, not over it).
    Returns the comparison of ``a`` minus ``b`` and the written paths.
    """
    from ..report import run_settings, write_report

    out = Path(out)
    comparison = profile.compare(a, b, min_cells=min_cells, permutations=permutations, seed=seed, within=within, by=by)
    contrast = {
        "a": comparison.a, "b": comparison.b, "min_cells": comparison.min_cells,
        "permutations": comparison.permutations, "seed": int(seed), "unit": comparison.unit,
        "within": comparison.within, "by": by,
    }  # fmt: skip
    written = {}
    if save_profile:
        profile.meta["contrast"] = contrast
        written["profile"] = profile.save(out / "profile.npz")
    written["tables"] = comparison.save(out / "tables")
    if figures:
        from ..plots import save_figures

        written["figures"] = save_figures(comparison.profile, comparison, out / "figures")
    pngs = {p.stem: p.read_bytes() for p in written.get("figures", []) if p.suffix == ".png"}
    tables = sorted(str(p.relative_to(out)) for p in (out / "tables").iterdir() if p.is_file())
    written["report"] = write_report(comparison, out / "report.html", figures=pngs, tables=tables,
                                     settings=run_settings(profile, command))  # fmt: skip
    return {"comparison": comparison, "paths": written}
