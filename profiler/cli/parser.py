"""The command line's parser: one builder per subcommand; the options run and validate share."""

from __future__ import annotations

import argparse

from ..blocks import PSEUDO_REPLICATES
from ..tables import DEFAULT_MIN_CELLS, DEFAULT_PERMUTATIONS
from .common import MIN_CELLS_HELP, OVERWRITE_HELP


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnprof",
        description="Exact group-wise attention statistics of transformer models (single-cell front ends: "
        "Nicheformer, Geneformer, scGPT).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_run_parser(sub)
    add_merge_parser(sub)
    add_demo_parser(sub)
    add_validate_parser(sub)
    add_plot_parser(sub)
    add_report_parser(sub)
    add_compare_parser(sub)
    add_figure_parser(sub)
    return parser


def _add_input_options(p: argparse.ArgumentParser) -> None:
    """Model, vocabulary, counts and tokenization options shared by run and validate."""
    from ..singlecell.registry import FAMILIES
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
    src.add_argument("--use-raw", action="store_true", help="take counts from ..raw")
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
    f.add_argument("--token-dictionary",
                   help="Geneformer token dictionary (.pkl; read as plain data unless --trust-checkpoint)")
    f.add_argument("--gene-medians",
                   help="Geneformer gene median dictionary (.pkl; read as plain data unless --trust-checkpoint)")
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
    c.add_argument("--map-bins", type=_at_least(0), default=0, metavar="N",
                   help="whole-context maps: each head's attention over the whole context in N x N bins of positions "
                   "(e.g. 32; default 0: none; `attnprof figure` draws them)")
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
    p.add_argument("--all-genes", action="store_true",
                   help="keep the gene sums of every vocabulary id (default: the ids the data holds; the same tables "
                   "in less memory); needed to merge profiles of data with other gene panels")
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
                   help="seed of the random relabelings" + (" (default: the profiles' run's)" if saved else
                   " and of the pseudo-replicate blocks; shards of one run need the same (default 0)"))


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


def add_demo_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="generate a small dataset and model, then profile them (no download)",
        description="Generate a MERFISH-like dataset with planted sex-biased genes, a matching vocabulary, "
        "means and a seeded small Nicheformer, then run `attnprof run` and `attnprof figure` on them.",
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


def add_validate_parser(sub) -> None:
    p = sub.add_parser(
        "validate",
        help="check the fast backend against the reference and the model's own maps on a sample of cells",
        description="Profile a sample of cells with the fast backend, with `reference` and from the model's own "
        "attention maps (need_weights=True, or output_attentions=True for transformers models); print the error "
        "table, naming the backend that ran, and exit with status 1 when any error exceeds the tolerance.",
    )
    _add_input_options(p)
    p.add_argument("--groupby", help="obs column of the groups (default: all cells in one group)")
    p.add_argument("--cells", type=int, default=64, help="cells to check, the first selected (default 64)")


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


def add_figure_parser(sub) -> None:
    p = sub.add_parser(
        "figure",
        help="draw the Nicheformer paper's Extended Data Fig. 4 (panels A-G) from a run folder, with a CSV per panel",
        description="Draw panels A-G of the Nicheformer paper's Extended Data Fig. 4 from a run's profile.npz: one "
        "head's maps per value of a key (A: the head that differs least between the values, B: most), a gallery of "
        "heads (C), the average over heads of |D| per layer for all genes (D) and a gene set (E), and the maximum "
        "over heads, both readings, within a subset (F) and over all cells (G). Writes OUT/figure/: figure.png (and "
        ".pdf with --pdf), panel_X.png and panel_X.csv per panel, captions.md. Layers and heads: attnprof's 0-based "
        "numbers (the paper's 1-based ones beside them). See docs/figure.md.",
    )
    p.add_argument("run", metavar="OUT", help="a run folder (with profile.npz) or a profile .npz file")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="groups to compare (default: the run's contrast)")
    p.add_argument("--maps-by", metavar="KEY", help="key whose values panels A-C draw side by side (default: the "
                   "run's --groupby; any --subset-by key of the run)")
    p.add_argument("--head-a", metavar="L:H", help="panel A's head, 0-based as in the tables (default: the head whose maps differ least)")
    p.add_argument("--head-b", metavar="L:H", help="panel B's head (default: the head whose maps differ most)")
    p.add_argument("--gallery", metavar="L:H,...", help="panel C's heads (default: one per kind of pattern, "
                   "picked from the head summaries)")
    p.add_argument("--gallery-group", metavar="VALUE", help="panel C's cells: a value of --maps-by (default: the "
                   "one with the most cells)")
    p.add_argument("--within", metavar="KEY=VALUE", help="panel F's cells, e.g. cell_type=Astro (default: the "
                   "value with the most cells of the run's cell-type --subset-by key)")
    p.add_argument("--gene-set", metavar="NAME", help="panel E's gene set (default: the run's first --gene-set)")
    p.add_argument("--min-cells", type=_at_least(0), metavar="N", help=f"{MIN_CELLS_HELP} (default: the run's)")
    p.add_argument("--out", metavar="DIR", help="figure folder (default: OUT/figure)")
    p.add_argument("--pdf", action="store_true", help="also write figure.pdf (vector; adds a few seconds)")
    p.add_argument("--overwrite", action="store_true",
                   help="also replace files in the figure folder that no attnprof manifest lists")
