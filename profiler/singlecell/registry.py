"""The registry of model families: how each is recognized, which options it reads, how it loads.

One table, :data:`FAMILIES`: the run, validate and the command line know no family by name. Each family
is a sub-package (``nicheformer``, ``geneformer``, ``scgpt``) with a front end
(:class:`~attnprof.singlecell.family.FrontEnd`) over its own model, tokenizer and files; this module imports a
family only when it loads one.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

FAMILIES = ("nicheformer", "geneformer", "scgpt")
#: The family of a model given without one (``profile_anndata(model, ...)`` with no ``family=``, ``attnprof run``
#: without ``--model`` or ``--family``): the family attnprof was first built for.
DEFAULT_FAMILY = "nicheformer"


def detect_family(model_path) -> str | None:
    """The family of the files at ``model_path`` when the files say so unambiguously, else None.

    A folder with ``config.json`` of ``model_type`` ``bert``: Geneformer; a folder with
    ``args.json`` and ``vocab.json``: scGPT; a single file: Nicheformer (its Lightning checkpoint).
    """
    path = Path(model_path)
    if path.is_file():
        return "nicheformer"
    if not path.is_dir():
        return None
    if (path / "args.json").is_file() and (path / "vocab.json").is_file():
        return "scgpt"
    config = path / "config.json"
    if config.is_file():
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (json.JSONDecodeError, AttributeError):
            return None
        return "geneformer" if model_type == "bert" else None
    return None


def check_family(family: str, model_path) -> str:
    """The family to run: as asked, checked against the model files (a mismatch is an error)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    found = None if model_path is None else detect_family(model_path)
    if found is not None and found != family:
        raise ValueError(
            f"{model_path} holds a {found} model, but --family {family} was given: "
            f"pass --family {found}, or the {family} model's files"
        )
    return family


#: Options (CLI names with underscores) that only one family reads, with their defaults.
FAMILY_OPTIONS = {
    "nicheformer": {"vocab": None, "means": None, "heads": None, "species": "mouse", "assay": "MERFISH",
                    "modality": "spatial", "tokenization": "notebook", "seed": 0, "species_key": None,
                    "assay_key": None, "modality_key": None},
    "geneformer": {"token_dictionary": None, "gene_medians": None, "counts_key": "n_counts"},
    "scgpt": {"scgpt_mode": "embed", "scgpt_seed": 0, "scgpt_workers": None, "scgpt_batch_size": None},
}


def check_family_options(family: str, given: dict) -> None:
    """Refuse options of another family (``given``: option -> value): ignoring them would profile other inputs."""
    foreign = [f"--{name.replace('_', '-')}" for other, options in FAMILY_OPTIONS.items() if other != family
               for name, default in options.items() if given.get(name, default) != default]  # fmt: skip
    if foreign:
        one = len(foreign) == 1
        raise ValueError(
            f"{', '.join(foreign)} {'is' if one else 'are'} not read for a {family} model (--family {family}): "
            f"drop {'it' if one else 'them'}, or pick the family {'it belongs' if one else 'they belong'} to"
        )
    if family == "nicheformer" and given.get("max_length") is not None:
        raise ValueError("--max-length is read for Geneformer and scGPT; a Nicheformer reads its context length "
                         "from the checkpoint")  # fmt: skip


def load_front_end(family: str, model_path, *, token_dictionary=None, gene_medians=None, counts_key="n_counts",
                   max_length=None, scgpt_mode="embed", seed=0, trust_checkpoint=False, quiet=False):
    """(model, front end) of a Geneformer or scGPT from its published files; errors name the missing file.

    trust_checkpoint: allow files that hold pickled code (Geneformer's dictionaries and ``pytorch_model.bin``,
    scGPT's ``best_model.pt``); without it they are read as data only. quiet: transformers' output off.
    """
    check_family(family, model_path)
    if model_path is None:
        raise ValueError(f"--family {family} needs --model: the {family} model folder")
    if family == "geneformer":
        from .geneformer import geneformer_front_end, load_geneformer_model, require_transformers

        require_transformers()  # before any file is read

        missing = [n for n, v in (("--token-dictionary", token_dictionary), ("--gene-medians", gene_medians)) if v is None]
        if missing:
            raise ValueError(
                f"--family geneformer needs {' and '.join(missing)}: Geneformer's token dictionary and gene "
                f"median dictionary (.pkl) of the model's release"
            )
        model = load_geneformer_model(model_path, trust_checkpoint=trust_checkpoint, quiet=quiet)
        front = geneformer_front_end(model, token_dictionary, gene_medians, input_size=max_length,
                                     counts_key=counts_key, trust_checkpoint=trust_checkpoint)  # fmt: skip
        return model, front
    if family == "scgpt":
        from .scgpt import load_scgpt, scgpt_front_end

        model, vocab, args = load_scgpt(model_path, trust_checkpoint=trust_checkpoint)
        return model, scgpt_front_end(vocab, args, mode=scgpt_mode, max_length=max_length, seed=seed)
    raise ValueError(f"load_front_end loads geneformer or scgpt models, not {family!r}")


def load_family(options: dict, adata) -> tuple:
    """(model, front end) from the command line's options (``vars(args)``): the family as given or detected from
    ``model`` (default Nicheformer), its options checked, its files loaded."""
    model_path = options.get("model")
    family = options.get("family") or (detect_family(model_path) if model_path else None) or DEFAULT_FAMILY
    check_family_options(family, options)
    if family == "nicheformer":
        return _load_nicheformer(options, adata)
    model, front = load_front_end(
        family, model_path, token_dictionary=options.get("token_dictionary"),
        gene_medians=options.get("gene_medians"), counts_key=options.get("counts_key", "n_counts"),
        max_length=options.get("max_length"), scgpt_mode=options.get("scgpt_mode", "embed"),
        seed=options.get("scgpt_seed", 0), trust_checkpoint=options.get("trust_checkpoint", False),
        quiet=options.get("quiet", False),
    )  # fmt: skip
    if family == "scgpt":  # embed mode draws as embed_data's DataLoader workers do (docs/reliability.md)
        front = front.with_loader(options.get("scgpt_workers"), options.get("scgpt_batch_size"))
    return model, front


def default_front_end(model, adata, vocab=None, means=None, **reading_and_context):
    """The front end of a model given without its family (:data:`DEFAULT_FAMILY`'s), built from the run's
    vocabulary, technology means, where the counts are and the context tokens."""
    from .nicheformer import nicheformer_front

    return nicheformer_front(model, adata, vocab, means, **reading_and_context)


def _load_nicheformer(options: dict, adata) -> tuple:
    """A Nicheformer checkpoint with its vocabulary, or without ``model`` an untrained small one over the data's
    genes (said in a warning), and its front end."""
    from .alignment import count_matrix, gene_names
    from .nicheformer import load_nicheformer, nicheformer_front, small_nicheformer
    from .vocab import Vocabulary

    model_path, vocab = options.get("model"), options.get("vocab")
    vocab = Vocabulary.from_file(vocab) if vocab else None
    reading = {k: options.get(k) for k in ("layer", "use_raw", "gene_key")}
    if model_path:
        check_family("nicheformer", model_path)
        if vocab is None:
            raise ValueError(
                "--model needs --vocab: the gene list the checkpoint was trained with "
                "(a text file or an .h5ad whose var names are the genes, e.g. Nicheformer's model.h5ad)"
            )
        model = load_nicheformer(model_path, n_heads=options.get("heads"),
                                 trust_checkpoint=options.get("trust_checkpoint", False))  # fmt: skip
    else:
        if vocab is None:
            var = count_matrix(adata, reading["layer"], bool(reading["use_raw"]))[1]
            vocab = Vocabulary(gene_names(var, reading["gene_key"]), source="the data's genes")
        seed = options.get("seed", 0)
        warnings.warn(
            f"no --model: profiling an untrained small Nicheformer (seed {seed}) over {vocab.source}; "
            f"the numbers exercise the pipeline, they say nothing about biology",
            stacklevel=3,
        )
        model = small_nicheformer(vocab.n_tokens, seed=seed)
    context = {k: options.get(k) for k in ("species", "assay", "modality", "tokenization", "species_key",
                                           "assay_key", "modality_key")}  # fmt: skip
    return model, nicheformer_front(model, adata, vocab, options.get("means"), **reading, **context)
