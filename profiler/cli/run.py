"""``attnprof run``: profile an .h5ad (one process, a shard, or a torchrun job) and write the run folder."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from ..checks import describe_groups, nothing_to_compare
from ..outputs import RunFolder, written_summary
from ..summary import design_record, layer_summary
from .common import (
    EXIT_NOTHING, check_design_options, checkpointing, gene_list, gene_sets, model_and_front, open_data,
    parse_shard, silenced, torch_device,
)


def cmd_run(args) -> int:
    from ..distributed import process_group

    device = torch_device(args.device)
    with process_group(device) as (rank, world):
        with silenced(rank != 0):  # one job, one set of warnings and outputs: rank 0's
            return _run(args, device, rank, world)


def _run(args, device, rank: int, world: int) -> int:
    folder = RunFolder(args.out or f"attnprof_{Path(args.data).stem}", overwrite=args.overwrite).check()
    with folder.claimed():  # a run failing before it writes leaves no empty folder behind
        return _profile_and_write(args, folder, rank, world, device)


def _profile_and_write(args, folder: RunFolder, rank: int, world: int, device) -> int:
    from ..singlecell.batches import select_cells
    from ..singlecell.run import profile_anndata
    from ..singlecell.write import write_outputs

    shard = parse_shard(args.shard)
    check_design_options(args)
    out = folder.path
    with open_data(args.data) as adata:
        for key in (args.replicate, args.strata):  # before the model loads
            if key is not None and key not in adata.obs.columns:
                raise ValueError(f"obs has no column {key!r} (columns: {list(adata.obs.columns)})")
        with warnings.catch_warnings():  # profiling warns about the same cells below
            warnings.simplefilter("ignore")
            groups = select_cells(adata.obs, args.groupby, groups=args.compare, subset=args.subset).groups
            every = select_cells(adata.obs, args.groupby, subset=args.subset).groups  # all kept, --compare first
        if args.compare is None and len(groups) != 2:
            raise ValueError(
                f"obs[{args.groupby!r}] has {describe_groups(groups, adata.obs[args.groupby])}: "
                f"name the two to compare with --compare A B"
            )
        every = groups + [g for g in every if g not in groups]
        sets = gene_sets(args.gene_set)
        model, front = model_and_front(args, adata, device)
        profile = profile_anndata(
            model, adata, args.groupby, groups=every, panel=gene_list(args.panel),
            layer=args.layer, use_raw=args.use_raw, gene_key=args.gene_key, subset=args.subset,
            window=args.window, map_bins=args.map_bins,
            batch_size=args.batch_size, backend=args.backend, progress=not args.quiet,
            replicate=args.replicate, strata=args.strata, pseudo_replicates=args.pseudo_replicates,
            subset_by=args.subset_by, gene_sets=sets, all_genes=args.all_genes,
            seed=args.permutation_seed, shard=shard, **checkpointing(args, out),
            family=front,
        )  # fmt: skip
    if rank != 0:
        return 0
    command = ["attnprof", *sys.argv[1:]] if args.argv is None else ["attnprof", *args.argv]
    folder.clear_previous()  # the replaced run's outputs go only now that this run has its result
    empty = nothing_to_compare(profile, groups[0], groups[1], args.min_cells)
    with folder.staged(record={"command": command}) as staging:  # beside --out, moved in when complete
        if empty:
            profile.save(staging / "profile.npz")
        else:
            result = write_outputs(profile, groups[0], groups[1], staging, min_cells=args.min_cells,
                                   permutations=args.permutations, seed=args.permutation_seed,
                                   figures=not args.no_figures, command=command)  # fmt: skip
    record = {
        "command": command,
        "contrast": [groups[0], groups[1]],
        "tokenizer": profile.meta.get("options", {}).get("tokenizer"),  # context keys, means file per technology
        "cells": profile.cells,
        "replicates": profile.replicates,
        **design_record(None if empty else result["comparison"], profile),
        "shard": list(shard) if shard else None,
        "world_size": world,
        "resumed_cells": profile.meta.get("resumed_cells", 0),
        "elapsed_s": profile.meta.get("elapsed_s"),
    }
    outputs = folder.finish(record)["outputs"]
    if empty:
        print(f"attnprof: {empty}; wrote only {out}/profile.npz and run.json (no tables or figures)", file=sys.stderr)
        return EXIT_NOTHING
    print(layer_summary(result["comparison"], profile))
    print(f"\nwrote {out}/: {written_summary(outputs)}")
    return 0
