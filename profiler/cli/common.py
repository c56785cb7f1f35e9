"""Helpers the commands share: opening data, devices, the model and its front end, gene lists."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

from ..checks import open_h5ad
from ..tables import MAX_PERMUTATIONS


@contextmanager
def open_data(path):
    adata = open_h5ad(path)  # backed: X and raw.X stay on disk
    try:
        yield adata
    finally:
        adata.file.close()

#: Exit status for bad input (argparse uses it too).
EXIT_USAGE = 2
#: Exit status of a run that profiled its cells but has nothing to compare (no tables or figures).
EXIT_NOTHING = 1
MIN_CELLS_HELP = "cells an element needs per group, or per replicate with --replicate"
OVERWRITE_HELP = ("replace the run in --out: its listed outputs are removed first (default: refuse a folder "
                  "holding another run)")


def profile_path(source) -> Path:
    """A profile .npz given as itself or as the run folder that holds profile.npz."""
    source = Path(source)
    path = source / "profile.npz" if source.is_dir() else source
    if not path.exists():
        raise FileNotFoundError(f"no profile at {path}: give a run folder of `attnprof run` or a profile .npz")
    return path


def check_design_options(args) -> None:
    """The permutation and replicate options, before any work."""
    if not 0 <= args.permutations <= MAX_PERMUTATIONS:
        raise ValueError(f"--permutations must be between 0 (no permutation null) and {MAX_PERMUTATIONS:,} (p down to "
                         f"1e-5; more only costs time), got {args.permutations}")  # fmt: skip
    if args.pseudo_replicates < 1:
        raise ValueError(f"--pseudo-replicates must be at least 1 per group, got {args.pseudo_replicates}")
    if args.strata is not None and args.replicate is None:
        raise ValueError("--strata names strata of replicates: give --replicate too")


def parse_shard(value: str | None) -> tuple[int, int] | None:
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


def checkpointing(args, out: Path) -> dict:
    """profile_anndata's checkpoint options for --checkpoint-every (the file lives in the output folder)."""
    if args.checkpoint_every is None:
        return {}
    if args.checkpoint_every < 1:
        raise ValueError(f"--checkpoint-every must be at least 1 cell, got {args.checkpoint_every}")
    return {"checkpoint": out / "checkpoint.npz", "checkpoint_every": args.checkpoint_every}


def torch_device(name: str):
    """The torch device of --device; ``auto``: this rank's GPU when there is one, else the CPU."""
    from ..devices import parse_device

    return parse_device(name)  # checked here, before any data or model loads


@contextmanager
def silenced(silent: bool):
    """Warnings off while ``silent`` (the other ranks of a torchrun job: rank 0 speaks for all)."""
    with warnings.catch_warnings():
        if silent:
            warnings.simplefilter("ignore")
        yield


def model_and_front(args, adata, device):
    """The model on its device and its family's front end (tokenizer and model call): see the registry."""
    from ..singlecell.registry import load_family

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model, front = load_family(vars(args), adata)
    return model.to(device), front


def gene_list(value: str | None, option: str = "--panel") -> list[str] | None:
    """Genes from a file (one per line) or a comma-separated list."""
    if value is None:
        return None
    path = Path(value)
    names = path.read_text().splitlines() if path.is_file() else value.split(",")
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError(f"{option} {value!r} names no genes")
    return names


def gene_sets(specs) -> dict[str, list[str]]:
    """--gene-set NAME=FILE (or NAME=gene,gene,...) options as name -> genes."""
    out = {}
    for spec in specs or []:
        name, sep, value = spec.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ValueError(f"--gene-set {spec!r}: give NAME=FILE (one gene per line) or NAME=gene,gene,...")
        if name.strip() in out:
            raise ValueError(f"--gene-set {name.strip()!r} is given twice")
        out[name.strip()] = gene_list(value.strip(), f"--gene-set {name.strip()}")
    return out


def layer_heads(value: str | None, option: str = "--gallery") -> list[tuple[int, int]] | None:
    """``L:H,L:H`` as [(L, H), ...] (attnprof's 0-based numbers)."""
    if value is None:
        return None
    try:
        pairs = [tuple(int(x) for x in item.split(":")) for item in value.split(",") if item.strip()]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 for p in pairs):
        several = option == "--gallery"
        raise ValueError(f"{option} takes layer:head (0-based, as attnprof's tables)"
                         f"{' pairs separated by commas' if several else ''}, e.g. {'0:1,3:2' if several else '0:1'}; "
                         f"got {value!r}")  # fmt: skip
    return pairs
