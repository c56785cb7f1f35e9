"""``attnprof merge``: sum the profiles of shards into one, and write its tables."""

from __future__ import annotations

import sys
from pathlib import Path

from ..checks import nothing_to_compare
from ..outputs import RunFolder, check_writable_file, written_summary
from ..merging import check_disjoint
from ..profile import Profile
from ..summary import design_record, layer_summary, saved_contrast
from ..tables import DEFAULT_PERMUTATIONS
from .common import profile_path


def cmd_merge(args) -> int:
    from ..singlecell.write import write_outputs

    if not args.output and not args.out:
        raise ValueError("say where to write: -o FILE for the merged profile, --out DIR for its tables, or both")
    paths = [profile_path(p) for p in args.profiles]
    output = args.output and check_writable_file(args.output, "-o", args.overwrite, paths)
    folder = args.out and RunFolder(args.out, overwrite=args.overwrite).check()
    merged = merge_files(paths)
    cells = ", ".join(f"{g} {n}" for g, n in merged.cells.items())
    headline = f"merged {len(paths)} profiles: {sum(merged.cells.values())} cells ({cells})"
    if output:
        print(f"wrote {merged.save(output)}")
    if not folder:
        print(headline)
        return 0
    a, b, min_cells = saved_contrast(merged, args.compare, args.min_cells)
    saved = merged.meta.get("contrast", {})
    permutations = saved.get("permutations", DEFAULT_PERMUTATIONS) if args.permutations is None else args.permutations
    seed = saved.get("seed", 0) if args.permutation_seed is None else args.permutation_seed
    empty = nothing_to_compare(merged, a, b, min_cells)
    if empty:
        raise ValueError(f"{empty}: no tables or figures to write in {folder.path}")
    with folder.claimed():
        folder.clear_previous()
        command = ["attnprof", *(sys.argv[1:] if args.argv is None else args.argv)]
        with folder.staged(record={"command": command}) as staging:
            result = write_outputs(merged, a, b, staging, min_cells=min_cells, permutations=permutations,
                                   seed=seed, figures=not args.no_figures, command=command)  # fmt: skip
        record = {"command": command, "merged": [str(p) for p in paths], "contrast": [a, b], "cells": merged.cells,
                  "replicates": merged.replicates, **design_record(result["comparison"], merged)}  # fmt: skip
        outputs = folder.finish(record)["outputs"]
    print(layer_summary(result["comparison"], merged, headline=headline))
    print(f"\nwrote {folder.path}/: {written_summary(outputs)}")
    return 0


def merge_files(paths) -> Profile:
    """Load and sum saved profiles; an error names the file that does not fit."""
    paths = [Path(p) for p in paths]
    seen = set()
    for path in paths:
        if path.resolve() in seen:
            raise ValueError(f"{path} is given twice: merging it twice would count its cells twice")
        seen.add(path.resolve())
    profiles = [Profile.load(path) for path in paths]
    check_disjoint(profiles, paths)  # before summing: names both files and the cells they share
    total = profiles[0]
    for path, profile in zip(paths[1:], profiles[1:]):
        try:
            total = total + profile
        except ValueError as e:
            raise ValueError(f"cannot merge {path} into {paths[0]}: {e}") from e
    return total
