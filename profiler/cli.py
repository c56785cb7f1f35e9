"""The ``attnprof`` command: run, merge, demo, validate, plot, report.

One small function per subcommand (``cmd_<name>``) and one parser builder
per subcommand (``add_<name>_parser``); shared options live in
``_add_input_options``. Bad input exits with status 2 and a one-line
``attnprof: error: ...`` that names the problem and the fix.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

from . import warnings_log
from .checks import describe_groups, nothing_to_compare, open_h5ad
from .outputs import RunFolder, check_writable_file, list_outputs, written_summary
from .profile import Profile, check_disjoint
from .blocks import PSEUDO_REPLICATES
from .rebuild import cmd_report
from .signals import Terminated, terminate_as_interrupt
from .summary import design_record, layer_summary, saved_contrast
from .tables import DEFAULT_MIN_CELLS, DEFAULT_PERMUTATIONS, MAX_PERMUTATIONS

#: Exit status for bad input (argparse uses it too).
EXIT_USAGE = 2
#: Exit status of a run that profiled its cells but has nothing to compare (no tables or figures).
EXIT_NOTHING = 1
MIN_CELLS_HELP = "cells an element needs per group, or per replicate with --replicate"
OVERWRITE_HELP = ("replace the run in --out: its listed outputs are removed first (default: refuse a folder "
                  "holding another run)")


# ------------------------------------------------------------------ parsers
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnprof",
        description="Exact group-wise attention statistics of transformer models (Nicheformer front end).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_run_parser(sub)
    add_merge_parser(sub)
    add_demo_parser(sub)
    add_validate_parser(sub)
    add_plot_parser(sub)
    add_report_parser(sub)
    add_compare_parser(sub)
    return parser


def _add_input_options(p: argparse.ArgumentParser) -> None:
    """Model, vocabulary, counts and tokenization options shared by run and validate."""
    from .singlecell.registry import FAMILIES
    p.add_argument("data", help="the .h5ad file (read backed, chunk by chunk)")
    m = p.add_argument_group("model")
    m.add_argument("--model", help="Nicheformer Lightning checkpoint (.ckpt), Geneformer or scGPT model folder; "
                   "default: an untrained small Nicheformer")
    m.add_argument("--family", choices=FAMILIES,
                   help="model family (default: detected from --model, else nicheformer)")
    m.add_argument("--heads", type=_at_least(1), help="attention heads, for checkpoints without hyper_parameters")
    m.add_argument("--trust-checkpoint", action="store_true",
                   help="allow a checkpoint that holds pickled Python objects (runs its code: trusted files only)")
    m.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:1, ... (default: cuda when available; cuda:LOCAL_RANK under torchrun)")
    m.add_argument("--seed", type=int, default=0, help="seed of the untrained model without --model (default 0)")
    m.add_argument("--threads", type=_at_least(1),
                   help="CPU threads for torch (default: torch's choice; 1 suits small models)")
    t = p.add_argument_group("tokenization")
    t.add_argument("--vocab", help="the model's gene list: text file (one gene per line) or .h5ad (var names)")
    t.add_argument("--means", action="append", metavar="FILE|ASSAY=FILE|FOLDER",
                   help="technology mean vector (.npy, one entry per vocabulary gene; default: ones). Several "
                   "technologies: repeat it, one ASSAY=FILE each (dissociated=FILE: every dissociated cell), or "
                   "give theislab/nicheformer's data/model_means/ folder; each cell uses its technology's")
    t.add_argument("--gene-key", help="var column with the gene names (default: var names)")
    src = t.add_mutually_exclusive_group()
    src.add_argument("--layer", help="take counts from this layer (default: X)")
    src.add_argument("--use-raw", action="store_true", help="take counts from .raw")
    t.add_argument("--tokenization", choices=("notebook", "dataset"), default="notebook",  # vocab.TOKENIZATIONS
                   help="which of Nicheformer's tokenizations to reproduce: its tokenization notebooks (the "
                        "pretraining tokens; default) or its NicheformerDataset class")
    t.add_argument("--species", default="mouse", help="species context token, name or id (default: mouse)")
    t.add_argument("--assay", default="MERFISH",
                   help="assay context token, name or id, e.g. Xenium or 9 (default: MERFISH)")
    t.add_argument("--modality", default="spatial", help="modality context token, name or id (default: spatial)")
    for kind in ("species", "assay", "modality"):
        t.add_argument(f"--{kind}-key", metavar="KEY",
                       help=f"obs column with each cell's {kind} (names or ids); overrides --{kind}")
    f = p.add_argument_group("Geneformer and scGPT")
    f.add_argument("--token-dictionary", help="Geneformer token dictionary (.pkl; a pickle: trusted files only)")
    f.add_argument("--gene-medians", help="Geneformer gene median dictionary (.pkl; a pickle: trusted files only)")
    f.add_argument("--counts-key", default="n_counts", help="obs column of total counts for Geneformer (default n_counts)")
    f.add_argument("--max-length", type=int,
                   help="tokens per cell (default: Geneformer 2048 (V1) or 4096 (V2); scGPT 1200)")
    f.add_argument("--scgpt-mode", choices=("embed", "tutorial"), default="embed",
                   help="scGPT preprocessing: embed (scgpt.tasks.embed_data) or tutorial (fine-tuning tutorials)")
    f.add_argument("--scgpt-seed", type=int, default=0, help="seed of scGPT's random binning and sampling (default 0)")
    f.add_argument("--scgpt-workers", type=int, help="embed_data's DataLoader workers, whose seeds the draws follow "
                   "(default: min(CPUs here, --scgpt-batch-size), as embed_data computes it on its machine)")
    f.add_argument("--scgpt-batch-size", type=int,
                   help="embed_data's batch_size (default 64), which deals the cells to the workers")
    c = p.add_argument_group("cells and statistics")
    c.add_argument("--subset", help="obs query of the cells to profile, e.g. \"cell_type == 'neuron'\"")
    c.add_argument("--panel", help="gene-pair panel: a file (one gene per line) or names separated by commas")
    c.add_argument("--window", type=int, default=64, help="position window of the attention maps (default 64)")
    c.add_argument("--backend", default="auto", help="auto, torch, triton or reference (default auto)")


def add_run_parser(sub) -> None:
    p = sub.add_parser(
        "run",
        help="profile an .h5ad and write tables, figures and the profile",
        description="Profile a Nicheformer, Geneformer or scGPT on the cells of an .h5ad grouped by an obs column, "
        "compare two groups and write the tables, figures and profile. Large datasets: --shard I/N profiles one shard "
        "(sum the shards with `attnprof merge`); under torchrun (`torchrun --nproc_per_node N -m attnprof.cli "
        "run ...`) every rank profiles its share, the sums are all-reduced and rank 0 writes the outputs; "
        "--checkpoint-every N lets the same command resume after a crash.",
    )
    _add_input_options(p)
    p.add_argument("--groupby", required=True, help="obs column whose values are the groups (e.g. sex); every "
                   "group is profiled and kept")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"),
                   help="the two groups the run's tables compare, A minus B (needed when the column has more than two; "
                   "`attnprof compare OUT A B` compares any pair later)")
    p.add_argument("--subset-by", action="append", default=[], metavar="KEY",
                   help="obs column (cell type, tissue) whose values are kept apart too, so that `attnprof compare OUT "
                   "A B --within KEY=VALUE` compares within one of them later (repeatable)")
    p.add_argument("--gene-set", action="append", default=[], metavar="NAME=FILE",
                   help="a gene set (file with one gene per line, or genes separated by commas): the heads and layers "
                   "tables gain the family set:NAME, the gene family restricted to the set (repeatable)")
    p.add_argument("--replicate", metavar="KEY",
                   help="obs column of the unit of replication (animal, donor, sample, section): sums are kept per "
                   "replicate and tests compare replicates, relabeling whole replicates (default: none; cells are "
                   "then treated as independent replicates, and the outputs say so)")
    p.add_argument("--strata", metavar="KEY",
                   help="obs column (batch, section) within which replicates' labels are exchanged; each replicate "
                   "must lie in one stratum")
    p.add_argument("--pseudo-replicates", type=int, default=PSEUDO_REPLICATES, metavar="K",
                   help=f"without --replicate: random blocks of cells per group for the permutation null "
                   f"(default {PSEUDO_REPLICATES})")
    p.add_argument("--batch-size", type=int, default=32, help="cells per forward pass (default 32)")
    p.add_argument("--min-cells", type=_at_least(0), default=DEFAULT_MIN_CELLS,
                   help=f"{MIN_CELLS_HELP} (default {DEFAULT_MIN_CELLS})")
    p.add_argument("--out", help="output folder (default: attnprof_<data name>)")
    p.add_argument("--no-figures", action="store_true", help="skip the figures")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    big = p.add_argument_group("large datasets")
    big.add_argument("--shard", metavar="I/N",
                     help="profile only shard I of N (every N-th selected cell from the I-th, I = 0..N-1); "
                     "sum the shards' profile.npz with `attnprof merge`")
    big.add_argument("--checkpoint-every", type=int, metavar="CELLS",
                     help="save the sums every CELLS cells to OUT/checkpoint.npz; rerunning the same command "
                     "after a crash resumes from it (default: no checkpoints)")
    _add_permutation_options(big)
    p.set_defaults(func=cmd_run)


def _add_permutation_options(p, saved: bool = False) -> None:
    """--permutations and --permutation-seed; ``saved``: default to what the profiles' run used."""
    default = None if saved else DEFAULT_PERMUTATIONS
    p.add_argument("--permutations", type=int, default=default, metavar="N",
                   help="relabelings of whole replicates (pseudo-replicates without --replicate) for the null band, "
                   "permutation and family-wise p-values of the heads and layers tables, computed after profiling "
                   "from the kept block sums; p resolves down to 1/(N+1) (default "
                   + ("the profiles' run's" if saved else f"{DEFAULT_PERMUTATIONS}: 0.001")
                   + "; all distinct relabelings when the design has fewer; 0 turns them off)")
    p.add_argument("--permutation-seed", type=int, default=None if saved else 0, metavar="SEED",
                   help="seed of the random relabelings and of the pseudo-replicate blocks; shards of one run need "
                   "the same (default 0)")


def add_merge_parser(sub) -> None:
    p = sub.add_parser(
        "merge",
        help="sum the profiles of shards into one (and write its tables)",
        description="Sum the profiles of shards of one dataset (from `attnprof run --shard I/N`, or runs over "
        "different files or subsets with the same model and options) into one profile: the same result as "
        "profiling every cell in one run. Refuses profiles of another layout, model, options or vocabulary, "
        "and the same cells twice. Give -o for the merged profile, --out for a run folder (tables, figures), "
        "or both.",
    )
    p.add_argument("profiles", nargs="+", metavar="PROFILE", help="profile .npz files or run folders (profile.npz)")
    p.add_argument("-o", "--output", metavar="FILE", help="write the merged profile to this .npz")
    p.add_argument("--out", metavar="DIR", help="write a run folder: profile.npz, tables/, figures/")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"),
                   help="groups to compare for --out, A minus B (default: the profiles' contrast)")
    p.add_argument("--min-cells", type=_at_least(0), metavar="N",
                   help=f"{MIN_CELLS_HELP} (default: the profiles')")
    _add_permutation_options(p, saved=True)
    p.add_argument("--no-figures", action="store_true", help="skip the figures")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP + "; and an existing -o file")
    p.set_defaults(func=cmd_merge)


def add_demo_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="generate a small dataset and model, then profile them (no download)",
        description="Generate a MERFISH-like dataset with planted sex-biased genes, a matching vocabulary, "
        "means and a seeded small Nicheformer, then run `attnprof run` on them.",
    )
    p.add_argument("--out", default="attnprof_demo", help="output folder (default: attnprof_demo)")
    p.add_argument("--cells", type=int, default=400, help="cells to generate (default 400)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the model (default 0)")
    p.add_argument("--backend", default="auto", help="auto, torch, triton or reference (default auto)")
    p.add_argument("--threads", type=_at_least(1), default=1,
                   help="CPU threads (default 1: fastest for the tiny model)")
    p.add_argument("--permutations", type=int, default=DEFAULT_PERMUTATIONS, metavar="N",
                   help=f"relabelings of whole animals for the null (default {DEFAULT_PERMUTATIONS})")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(func=cmd_demo)


def add_validate_parser(sub) -> None:
    p = sub.add_parser(
        "validate",
        help="check the fast backend against the reference and the model's own maps on a sample of cells",
        description="Profile a sample of cells with the fast backend, with `reference` and from the model's own "
        "attention maps (need_weights=True); print the error table, naming the backend that ran, and exit "
        "with status 1 when any error exceeds the tolerance.",
    )
    _add_input_options(p)
    p.add_argument("--groupby", help="obs column of the groups (default: all cells in one group)")
    p.add_argument("--cells", type=int, default=64, help="cells to check, the first selected (default 64)")
    p.set_defaults(func=cmd_validate)


def add_plot_parser(sub) -> None:
    p = sub.add_parser(
        "plot",
        help="draw the figures of a run folder (or a profile.npz)",
        description="Read a saved profile.npz and write the figures as PNG and PDF.",
    )
    p.add_argument("run", help="a run folder (with profile.npz) or a profile .npz file")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="groups to compare (default: the run's contrast)")
    p.add_argument("--layer", type=int, help="layer of the attention maps (default: the strongest difference)")
    p.add_argument("--head", type=int, help="head of the attention maps (default: the strongest difference)")
    p.add_argument("--groups", nargs="+", metavar="GROUP",
                   help="groups whose maps of that head are drawn side by side (default: the two compared, "
                   "with their difference); 'all' for every group of the profile")
    p.add_argument("--gallery", metavar="L:H,...",
                   help="draw figures/head_gallery: the maps of these layer:head pairs for one group, e.g. 0:1,3:2")
    p.add_argument("--gallery-group", metavar="GROUP", help="the gallery's group (default: the first compared)")
    p.add_argument("--min-cells", type=_at_least(0), help=f"{MIN_CELLS_HELP} (default: the run's)")
    p.add_argument("--out", help="figure folder (default: <run>/figures)")
    p.set_defaults(func=cmd_plot)


def _at_least(low: int):
    """An argparse type: an integer >= ``low`` (argparse turns the error into a usage message, exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def add_report_parser(sub) -> None:
    p = sub.add_parser(
        "report",
        help="rebuild a run folder's tables, figures and report.html from its profile.npz",
        description="Rebuild the tables, figures and report.html of a run folder from its profile.npz, e.g. after "
        "a run that failed or was killed once its profile was written (run.json then says complete: false).",
    )
    p.add_argument("out", metavar="OUT", help="the run folder (holds profile.npz)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="groups to compare (default: the run's contrast)")
    p.add_argument("--min-cells", type=_at_least(0), help=f"{MIN_CELLS_HELP} (default: the run's)")
    p.add_argument("--no-figures", action="store_true", help="skip the figures")
    p.add_argument("--overwrite", action="store_true",
                   help="also replace files in tables/, figures/ or report.html that no run.json lists")
    p.set_defaults(func=cmd_report)


def add_compare_parser(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="compare any two groups of a run folder's profile, within any subset, without re-running the model",
        description="Write the tables, figures and report of A minus B from a run folder's profile.npz into "
        "OUT/compare/<A>_vs_<B>[_within_<KEY>=<VALUE>] (or --to DIR). A and B are groups of the run's --groupby, "
        "or values of one of its --subset-by keys; --within KEY=VALUE compares only the cells of one subset.",
    )
    p.add_argument("out", metavar="OUT", help="the run folder (holds profile.npz)")
    p.add_argument("a", metavar="A", help="the first group (the difference is A minus B)")
    p.add_argument("b", metavar="B", help="the second group")
    p.add_argument("--within", action="append", default=[], metavar="KEY=VALUE",
                   help="compare only the cells with this value of a --subset-by key (repeatable)")
    p.add_argument("--by", metavar="KEY", help="the kept key whose values A and B are (default: found)")
    p.add_argument("--gene-set", action="append", default=None, metavar="NAME=FILE",
                   help="gene sets for the set:NAME families (default: the run's)")
    p.add_argument("--min-cells", type=_at_least(0), help=f"{MIN_CELLS_HELP} (default: the run's)")
    _add_permutation_options(p, saved=True)
    p.add_argument("--no-figures", action="store_true", help="skip the figures")
    p.add_argument("--to", metavar="DIR", help="output folder (default: OUT/compare/<A>_vs_<B>...)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier compare in that folder")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args) -> int:
    from .recompare import compare_folder

    return compare_folder(args, _gene_sets(args.gene_set) if args.gene_set is not None else None)


# ---------------------------------------------------------------- commands
def cmd_run(args) -> int:
    from .distributed import process_group

    device = _device(args.device)
    with process_group(device) as (rank, world):
        with _silenced(rank != 0):  # one job, one set of warnings and outputs: rank 0's
            return _run(args, device, rank, world)


def _run(args, device, rank: int, world: int) -> int:
    folder = RunFolder(args.out or f"attnprof_{Path(args.data).stem}", overwrite=args.overwrite).check()
    with folder.claimed():  # a run failing before it writes leaves no empty folder behind
        return _profile_and_write(args, folder, rank, world, device)


def _profile_and_write(args, folder: RunFolder, rank: int, world: int, device) -> int:
    from .singlecell.batches import select_cells
    from .singlecell.run import profile_anndata, write_outputs

    shard = _shard(args.shard)
    _check_design_options(args)
    out = folder.path
    with _open_data(args.data) as adata:
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
        gene_sets = _gene_sets(args.gene_set)
        model, front = _model_and_front(args, adata, device)
        profile = profile_anndata(
            model, adata, args.groupby, groups=every, panel=_panel(args.panel),
            layer=args.layer, use_raw=args.use_raw, gene_key=args.gene_key, subset=args.subset,
            window=args.window,
            batch_size=args.batch_size, backend=args.backend, progress=not args.quiet,
            replicate=args.replicate, strata=args.strata, pseudo_replicates=args.pseudo_replicates,
            subset_by=args.subset_by, gene_sets=gene_sets,
            seed=args.permutation_seed, shard=shard, **_checkpointing(args, out),
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


def cmd_merge(args) -> int:
    from .singlecell.run import write_outputs

    if not args.output and not args.out:
        raise ValueError("say where to write: -o FILE for the merged profile, --out DIR for its tables, or both")
    paths = [_profile_path(p) for p in args.profiles]
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


def cmd_demo(args) -> int:
    from .singlecell.demo import write_demo_inputs

    if args.cells < 2:
        raise ValueError(f"--cells must be at least 2 (a female and a male cell to compare), got {args.cells}")
    out = Path(args.out)
    RunFolder(out, overwrite=args.overwrite).check()  # before the inputs are written into it
    taken = [] if args.overwrite else sorted(p for p in (out / "inputs").glob("*") if p.is_file())
    if taken:  # the demo's inputs would replace them: never without --overwrite
        raise ValueError(f"--out {out}: {taken[0]} exists where the demo writes its inputs; give a new --out, or "
                         f"--overwrite to replace them")  # fmt: skip
    inputs = write_demo_inputs(out / "inputs", n_cells=args.cells, seed=args.seed)
    argv = [
        "run", str(inputs["data.h5ad"]), "--groupby", "sex", "--compare", "female", "male",
        "--model", str(inputs["model.ckpt"]), "--vocab", str(inputs["vocab.txt"]),
        "--means", str(inputs["means.npy"]), "--panel", str(inputs["panel.txt"]),
        "--replicate", "animal",
        "--backend", args.backend, "--threads", str(args.threads), "--permutations", str(args.permutations),
        "--out", str(out),
    ] + (["--quiet"] if args.quiet else []) + (["--overwrite"] if args.overwrite else [])  # fmt: skip
    print(f"demo inputs in {out / 'inputs'}; profiling them as:\n  attnprof {shlex.join(argv)}\n")
    run_args = build_parser().parse_args(argv)
    run_args.argv = argv
    status = cmd_run(run_args)
    if status == 0:
        from .singlecell.demo import findings

        comparison = Profile.load(out / "profile.npz").compare("female", "male", permutations=args.permutations)
        print("\n" + findings(comparison))
    return status


def cmd_validate(args) -> int:
    from .singlecell.batches import make_batches, select_cells
    from .validate import validate

    if args.cells < 1:
        raise ValueError(f"--cells must be at least 1, got {args.cells}")
    with _open_data(args.data) as adata:
        selection = select_cells(adata.obs, args.groupby, subset=args.subset, min_groups=1).head(args.cells)
        model, front = _model_and_front(args, adata, _device(args.device))
        chunks = front.chunks(adata, rows=selection.rows, layer=args.layer, use_raw=args.use_raw, gene_key=args.gene_key)
        batch = next(make_batches(chunks, selection.codes_for, batch_size=len(selection), bucket_size=len(selection)))
    device = next(model.parameters()).device
    tokens = batch.tokens.to(device)
    inputs, ids, genes = front.inputs(tokens), front.gene_ids(tokens), front.genes
    table = validate(
        model, inputs, groups=batch.codes, tokens=ids, group_names=selection.groups, backend=args.backend,
        genes=genes, panel=_panel(args.panel), window=args.window, n_context=front.n_context, adapter=front.adapter,
    )  # fmt: skip
    ran = table["backend"].iloc[0]
    against = ", ".join(dict.fromkeys(table["against"]))
    print(f"{len(batch)} cells x {tokens.shape[1]} tokens, backend {ran} (asked: {args.backend}) against: {against}")
    print(table.to_string(index=False, float_format=lambda x: f"{x:.2e}"))
    failed = table[~table["ok"]]
    if len(failed):
        which = ", ".join(f"{q} (vs {a.split(':')[0]})" for q, a in zip(failed["quantity"], failed["against"]))
        print(f"\nFAILED: {which} exceed the tolerance", file=sys.stderr)
        return 1
    print("\nall quantities within tolerance")
    return 0


def cmd_plot(args) -> int:
    from .plots import save_figures

    path = _profile_path(args.run)
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
                           gallery=_heads(args.gallery), gallery_group=args.gallery_group)  # fmt: skip
    list_outputs(path.parent, written)  # figures drawn into a run folder are that run's outputs
    for path in written:
        print(path)
    return 0


def _heads(value: str | None) -> list[tuple[int, int]] | None:
    """--gallery L:H,L:H as [(L, H), ...]."""
    if value is None:
        return None
    try:
        pairs = [tuple(int(x) for x in item.split(":")) for item in value.split(",") if item.strip()]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 for p in pairs):
        raise ValueError(f"--gallery takes layer:head pairs separated by commas, e.g. 0:1,3:2; got {value!r}")
    return pairs


# ----------------------------------------------------------------- helpers
@contextmanager
def _open_data(path):
    adata = open_h5ad(path)  # backed: X and raw.X stay on disk
    try:
        yield adata
    finally:
        adata.file.close()


def _profile_path(source) -> Path:
    """A profile .npz given as itself or as the run folder that holds profile.npz."""
    source = Path(source)
    path = source / "profile.npz" if source.is_dir() else source
    if not path.exists():
        raise FileNotFoundError(f"no profile at {path}: give a run folder of `attnprof run` or a profile .npz")
    return path


def _check_design_options(args) -> None:
    """The permutation and replicate options, before any work."""
    if not 0 <= args.permutations <= MAX_PERMUTATIONS:
        raise ValueError(f"--permutations must be between 0 (no permutation null) and {MAX_PERMUTATIONS:,} (p down to "
                         f"1e-5; more only costs time), got {args.permutations}")  # fmt: skip
    if args.pseudo_replicates < 1:
        raise ValueError(f"--pseudo-replicates must be at least 1 per group, got {args.pseudo_replicates}")
    if args.strata is not None and args.replicate is None:
        raise ValueError("--strata names strata of replicates: give --replicate too")


def _shard(value: str | None) -> tuple[int, int] | None:
    """--shard I/N as (I, N)."""
    if value is None:
        return None
    try:
        index, count = (int(x) for x in value.split("/"))
    except ValueError:
        index, count = -1, 0
    if not 0 <= index < count:
        raise ValueError(f"--shard takes I/N with 0 <= I < N, e.g. 0/4 for the first of four shards; got {value!r}")
    return index, count


def _checkpointing(args, out: Path) -> dict:
    """profile_anndata's checkpoint options for --checkpoint-every (the file lives in the output folder)."""
    if args.checkpoint_every is None:
        return {}
    if args.checkpoint_every < 1:
        raise ValueError(f"--checkpoint-every must be at least 1 cell, got {args.checkpoint_every}")
    return {"checkpoint": out / "checkpoint.npz", "checkpoint_every": args.checkpoint_every}


def _device(name: str):
    """The torch device of --device; ``auto``: this rank's GPU when there is one, else the CPU."""
    from .devices import parse_device

    return parse_device(name)  # checked here, before any data or model loads


@contextmanager
def _silenced(silent: bool):
    """Warnings off while ``silent`` (the other ranks of a torchrun job: rank 0 speaks for all)."""
    with warnings.catch_warnings():
        if silent:
            warnings.simplefilter("ignore")
        yield


def _model_and_front(args, adata, device):
    """The model on its device and its family's front end (tokenizer and model call): see the registry."""
    from .singlecell.registry import load_family

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model, front = load_family(vars(args), adata)
    return model.to(device), front


def _panel(value: str | None, option: str = "--panel") -> list[str] | None:
    """Genes from a file (one per line) or a comma-separated list."""
    if value is None:
        return None
    path = Path(value)
    names = path.read_text().splitlines() if path.is_file() else value.split(",")
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError(f"{option} {value!r} names no genes")
    return names


def _gene_sets(specs) -> dict[str, list[str]]:
    """--gene-set NAME=FILE (or NAME=gene,gene,...) options as name -> genes."""
    out = {}
    for spec in specs or []:
        name, sep, value = spec.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ValueError(f"--gene-set {spec!r}: give NAME=FILE (one gene per line) or NAME=gene,gene,...")
        if name.strip() in out:
            raise ValueError(f"--gene-set {name.strip()!r} is given twice")
        out[name.strip()] = _panel(value.strip(), f"--gene-set {name.strip()}")
    return out


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"attnprof: warning: {message}", file=sys.stderr if file is None else file)
    warnings_log.note(message)  # run.json and report.html list it too


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "argv"):
        args.argv = None if argv is None else list(argv)
    previous = warnings.showwarning
    warnings.showwarning = _show_warning  # one plain line per warning, without source lines
    try:
        with warnings_log.recording(), terminate_as_interrupt():
            return args.func(args)
    except (ValueError, OSError) as e:  # bad input; anything else is a bug: show its traceback
        print(f"attnprof: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:  # SIGINT, and SIGTERM (Terminated) the same way
        print(f"attnprof: interrupted{' (SIGTERM)' if isinstance(e, Terminated) else ''}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        warnings.showwarning = previous


if __name__ == "__main__":
    sys.exit(main())
