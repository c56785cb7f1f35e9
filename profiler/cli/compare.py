"""``attnprof compare OUT A B [--within KEY=VALUE]``: any contrast of a run's profile, without the model.

A run keeps every group of ``--groupby`` and every value of its ``--subset-by`` keys, so any pair can be
compared later, within any subset. The tables, figures and report go to their own folder (default
``OUT/compare/<A>_vs_<B>[_within_<KEY>=<VALUE>]``), written the way a run writes (beside it, moved in when
complete) with its own run.json; the run's profile is read, never rewritten.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from ..outputs import PROFILE, RunFolder, written_summary
from ..summary import design_record, layer_summary
from .common import gene_sets


def cmd_compare(args) -> int:
    from ..checks import nothing_to_compare
    from ..profile import Profile
    from ..singlecell.write import write_outputs
    from ..tables import DEFAULT_MIN_CELLS, DEFAULT_PERMUTATIONS, contrast_key

    run = Path(args.out)
    if not (run / PROFILE).is_file():
        raise FileNotFoundError(f"{run} holds no {PROFILE}: give the folder of an `attnprof run` that profiled "
                                f"its cells")  # fmt: skip
    within = _within(args.within)
    profile = Profile.load(run / PROFILE)
    if args.gene_set is not None:  # else the run's
        profile.meta["gene_sets"] = gene_sets(args.gene_set)
    dest = Path(args.to) if args.to else run / "compare" / _folder_name(args.a, args.b, within)
    folder = RunFolder(dest, overwrite=args.overwrite, option="--to").check()
    saved = profile.meta.get("contrast", {})
    min_cells = saved.get("min_cells", DEFAULT_MIN_CELLS) if args.min_cells is None else args.min_cells
    permutations = saved.get("permutations", DEFAULT_PERMUTATIONS) if args.permutations is None else args.permutations
    seed = saved.get("seed", 0) if args.permutation_seed is None else args.permutation_seed
    view = profile.view(args.by or contrast_key(profile, args.a, args.b), within)  # checks keys and values first
    empty = nothing_to_compare(view, args.a, args.b, min_cells)
    if empty:
        raise ValueError(empty + (f" (within {within})" if within else ""))
    command = ["attnprof", *(sys.argv[1:] if args.argv is None else args.argv)]
    with folder.claimed():
        folder.clear_previous()
        with folder.staged(record={"command": command}) as staging:
            result = write_outputs(profile, args.a, args.b, staging, min_cells=min_cells, permutations=permutations,
                                   seed=seed, figures=not args.no_figures, command=command, within=within,
                                   by=args.by, save_profile=False)  # fmt: skip
        comparison = result["comparison"]
        record = {"command": command, "profile": str(run / PROFILE), "contrast": [comparison.a, comparison.b],
                  "within": within, "cells": comparison.profile.cells, "replicates": comparison.profile.replicates,
                  **design_record(comparison, comparison.profile)}  # fmt: skip
        outputs = folder.finish(record)["outputs"]
    print(layer_summary(comparison, comparison.profile))
    print(f"\nwrote {folder.path}/: {written_summary(outputs)}")
    return 0


def _within(specs) -> dict[str, str]:
    out = {}
    for spec in specs or []:
        key, sep, value = spec.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"--within {spec!r}: give KEY=VALUE, e.g. --within 'cell_type=HY GABA'")
        if key in out:
            raise ValueError(f"--within names {key!r} twice")
        out[key] = value
    return out


def _folder_name(a: str, b: str, within: dict[str, str]) -> str:
    name = f"{a}_vs_{b}" + "".join(f"_within_{k}={v}" for k, v in within.items())
    return re.sub(r"[^\w.=+-]+", "_", name)  # spaces and slashes in group names stay out of paths
