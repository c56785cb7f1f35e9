"""Profile a single-cell model over the cells of an AnnData, grouped by an obs column (and kept apart by others).

:func:`profile_anndata` is the one call: select cells, tokenize them in
chunks, bucket and trim batches, and run them through the model inside a
:class:`attnprof.Profiler`. It keeps the sums per block (each replicate, or
pseudo-replicates of cells without a replicate key: what a permutation test
relabels at compare time), shards the cells (``shard=``, or by rank inside a
``torch.distributed`` job, whose sums it all-reduces), and saves checkpoints
a rerun resumes from. The run loop itself is :func:`profile_batches` (loop.py);
:func:`write_outputs` (write.py) writes a run's folder (profile, tables, figures).
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from collections.abc import Sequence

import numpy as np
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path

import torch

from ..blocks import PSEUDO_REPLICATES, design_blocks
from ..checkpoint import Checkpoint
from ..distributed import all_reduce_profile, rank_and_world, sum_over_ranks
from ..checks import open_h5ad
from ..merging import cell_ids
from ..profile import Profile
from .batches import ordered_values, select_cells
from .budget import check_memory
from .loop import _Run, cells_digest, plan_cells, profile_batches
from .registry import default_front_end
from .write import write_outputs

__all__ = ["profile_anndata", "profile_batches", "write_outputs", "model_description"]


def profile_anndata(
    model: torch.nn.Module,
    adata,
    groupby: str,
    *,
    groups: Sequence[str] | None = None,
    vocab=None,
    means=None,
    panel: Sequence[str] | None = None,
    layer: str | None = None,
    use_raw: bool = False,
    gene_key: str | None = None,
    subset: str | None = None,
    species="mouse",
    assay="MERFISH",
    modality="spatial",
    tokenization: str = "notebook",
    species_key: str | None = None,
    assay_key: str | None = None,
    modality_key: str | None = None,
    window: int = 64,
    map_bins: int = 0,
    batch_size: int = 32,
    chunk_size: int = 1024,
    bucket_size: int = 2048,
    backend: str = "auto",
    trim_padding: bool = True,
    replicate: str | None = None,
    strata: str | None = None,
    subset_by: Sequence[str] | None = None,
    gene_sets: dict[str, Sequence[str]] | None = None,
    all_genes: bool = False,
    pseudo_replicates: int = PSEUDO_REPLICATES,
    seed: int = 0,
    permutations: int | None = None,
    shard: tuple[int, int] | None = None,
    checkpoint=None,
    checkpoint_every: int = 10_000,
    progress: bool = True,
    family=None,
) -> Profile:
    """Group-wise attention sums of a model over the cells of ``adata``, kept per replicate.

    model:    a :class:`~attnprof.singlecell.Nicheformer` (anything with ``n_tokens``,
              ``context_length`` and ``forward(tokens)``), or the model of ``family``; run on its own device.
    adata:    an AnnData (in memory or backed) or the path of an ``.h5ad`` (opened backed).
    groupby:  the obs column whose categories are the groups (every one is kept); ``groups`` restricts and
              orders them.
    vocab:    the model's gene list (Vocabulary, path or names); default: the data's own genes.
    means:    the technology mean vector (array or ``.npy``); default: all ones. Several technologies: a
              folder of the published ``*_mean_script.npy`` files or ``{assay or "dissociated": file}``;
              each cell is divided by its technology's (see :mod:`attnprof.singlecell.nicheformer.technologies`).
    panel:    gene names whose pairwise attention is summed.
    layer, use_raw, gene_key: where the counts and gene names are (default ``X`` and var names).
    subset:   an obs query, e.g. ``"cell_type == 'neuron'"``.
    species, assay, modality: the context tokens, by name or id.
    species_key, assay_key, modality_key: obs columns with each cell's context (names or ids); a key
              overrides the run-wide value. Unknown values, and cells whose technology has no means, are
              refused before any cell is profiled.
    tokenization: ``"notebook"`` or ``"dataset"``, the upstream path to reproduce (see :mod:`attnprof.singlecell.nicheformer.tokenizer`).
    window:   position window of the per-head maps (at most the model's context length).
    map_bins: bins per axis of each head's whole-context map (e.g. 32: the context length in 32 x 32 bins; 0:
              none), per block like every sum (``profile.binned_map(group, layer, head)``).
    trim_padding: cut each batch to its longest cell (same results, less work).
    replicate: the obs column of the unit of replication (animal, donor, sample, section): sums are kept
              per replicate, and ``compare`` tests across replicates and relabels whole replicates. A
              replicate found in two groups is refused. Without it the cells of each group are dealt at
              random (``seed``) into ``pseudo_replicates`` blocks and the comparison treats cells as
              independent replicates (and says so).
    strata:   obs column within whose values labels are exchanged (batch, section); each replicate must
              lie in one stratum.
    subset_by: obs columns (cell type, tissue) whose values are kept apart too: the sums are kept per
              replicate, group and combination of these values, so ``profile.view(key, within=...)`` and
              ``compare(a, b, within={"cell_type": "HY GABA"})`` give any key's groups within any subset later.
    gene_sets: name -> genes (the vocabulary's names): the heads and layers tables gain a family
              ``set:<name>``, the gene family restricted to the set; recorded in the profile.
    all_genes: keep the gene sums of every vocabulary id; by default only of the ids the data can hold (its
              genes in the vocabulary, the context tokens and the panel): the same tables in a fraction of the
              memory. Profiles of data with other gene panels merge only when both keep all genes.
    permutations: deprecated and ignored: permutations are drawn at compare time from the block sums
              (``profile.compare(a, b, permutations=N)``), at no cost to this pass.
    shard:    ``(i, n)``: profile only every n-th selected cell starting at the i-th; the shards'
              profiles sum to the whole (:func:`attnprof.merge`). Inside an initialized
              ``torch.distributed`` default group the shard is ``(rank, world size)`` and the
              returned profile is already summed over the ranks (on every rank).
    checkpoint: a file to save the sums and the cells done to every ``checkpoint_every`` cells
              (atomically). If it exists, the run resumes from it: only the cells it lacks are
              profiled, and the result is that of an uninterrupted run. A checkpoint of another
              run (data, cells, model or options) is refused. Deleted when the run succeeds.
              With shards each keeps its own file, ``<name>.shard<i>of<n>.npz``.

    family:   the model family's :class:`~attnprof.singlecell.family.FrontEnd` (any family's; see
              ``attnprof.singlecell.registry``) that tokenizes and calls ``model`` in its family's way; ``vocab``,
              ``means`` and the context tokens are then unused. Default: the registry's default family's
              (Nicheformer), built from them.

    Returns a :class:`attnprof.Profile` whose genes are the names of the token ids the data can hold (every id
    with ``all_genes``; ``meta["token_ids"]`` their ids) and ``n_context`` the family's context tokens.
    """
    if permutations is not None:
        warnings.warn("profile_anndata(permutations=...) is ignored: permutations are drawn at compare time from "
                      "the replicate blocks (profile.compare(a, b, permutations=N))", DeprecationWarning, stacklevel=2)  # fmt: skip
    shard, distributed = _this_shard(shard)
    with _opened(adata) as (adata, source):
        selection = select_cells(adata.obs, groupby, groups=groups, subset=subset)
        front = family or default_front_end(
            model, adata, vocab, means, layer=layer, use_raw=use_raw, gene_key=gene_key, species=species,
            assay=assay, modality=modality, tokenization=tokenization, species_key=species_key,
            assay_key=assay_key, modality_key=modality_key,
        )
        context_length = front.context_length
        _check_options(window, context_length, chunk_size, bucket_size, map_bins)
        obs = adata.obs.iloc[selection.rows]
        subset_by = _subset_keys(subset_by, groupby)
        for key in (replicate, strata, *subset_by):
            if key is not None and key not in adata.obs.columns:
                raise ValueError(f"obs has no column {key!r} (columns: {list(adata.obs.columns)})")
        kept = None if all_genes else front.present_ids(adata, layer, use_raw, gene_key)
        genes, gene_index, special = _gene_axis(front, kept, _unique(panel))
        gene_sets = _checked_gene_sets(gene_sets, genes)
        blocks, block_codes = design_blocks(
            selection.codes, selection.groups, None if replicate is None else obs[replicate].to_numpy(),
            None if strata is None else obs[strata].to_numpy(), replicate_key=replicate or "replicate",
            strata_key=strata or "strata", per_group=pseudo_replicates, seed=seed,
            subsets={k: obs[k].to_numpy() for k in subset_by} or None,
        )  # fmt: skip
        check_memory(model, len(blocks), window, len(genes), len(_unique(panel) or []), map_bins)  # before the model
        plan = plan_cells(selection, shard, block_codes)
        names = adata.obs_names
        meta = {
            "special_tokens": special,  # known by id (positions in genes)
            "model": model_description(model),
            "options": {
                "groupby": groupby,
                "tokenizer": front.settings(),  # a family's: its name and tokenizer settings
                "counts": {"layer": layer, "use_raw": bool(use_raw), "gene_key": gene_key},
                "blocks": {"replicate": replicate, "strata": strata, "subset_by": subset_by,
                           "pseudo_replicates": None if replicate else int(pseudo_replicates),
                           "seed": None if replicate else int(seed)},
            },
            "data": {
                "source": source, "n_obs": int(adata.n_obs), "subset": subset, "cells": plan.counts(),
                "shard": None if shard == (0, 1) else list(shard), "cells_digest": plan.digest(names),
                "subset_values": {k: [v for v in ordered_values(obs[k]) if v in set(obs[k].astype(str))]
                                  for k in subset_by},  # the columns' order, for tables and figures
            },
        }  # fmt: skip
        run = _Run(
            reading=dict(layer=layer, use_raw=use_raw, gene_key=gene_key, chunk_size=chunk_size),
            batching=dict(batch_size=batch_size, bucket_size=bucket_size, trim=trim_padding, pad_to=context_length),
            stats=dict(groups=selection.groups, genes=genes,
                       panel=_unique(panel), window=window, n_context=front.n_context,
                       backend=backend, family=front, blocks=blocks, gene_index=gene_index, map_bins=map_bins),
            progress=progress and rank_and_world()[0] == 0,
            stream_rows=selection.rows,
        )  # fmt: skip
        whole = None  # names every shard's cells: for a checkpoint's fingerprint and a summed profile
        if checkpoint is not None or distributed:
            whole = cells_digest(names, selection.rows, selection.codes, selection.groups)
        ckpt = None
        if checkpoint is not None:
            fingerprint = run.fingerprint(meta, whole, shard)
            ckpt = Checkpoint.open(checkpoint, fingerprint, checkpoint_every, shard=shard)
            if ckpt.n_done and rank_and_world()[0] == 0:
                print(f"resuming: {ckpt.n_done} of {sum(plan.counts().values())} cells already done "
                      f"(checkpoint {ckpt.path})", file=sys.stderr, flush=True)  # fmt: skip
        profile, context_only = run.profile(model, adata, plan, meta, ckpt)
        counted = selection.rows if distributed else plan.rows[plan.codes >= 0]
        ids = cell_ids(source, names[counted])  # what lets a merge refuse any shared cell
    if distributed:
        profile = all_reduce_profile(profile)
        context_only = sum_over_ranks(context_only)
        profile.meta["data"].update(cells=selection.counts(), shard=None, cells_digest=whole)
    profile.cell_ids = ids
    profile.meta["data"]["context_only_cells"] = int(context_only)
    if gene_sets:
        profile.meta["gene_sets"] = gene_sets
    if kept is not None:
        profile.meta["token_ids"] = [int(i) for i in np.flatnonzero(gene_index >= 0)]  # the genes' token ids
    if context_only and rank_and_world()[0] == 0:
        warnings.warn(front.left_out_message(context_only), stacklevel=2)
    if ckpt is not None:
        ckpt.remove()  # the result is complete: a rerun starts afresh
    return profile


def _gene_axis(front, kept: np.ndarray | None, panel) -> tuple[list[str], np.ndarray | None, list[int]]:
    """The run's genes, token id -> position among them (None: every id, as is) and the special tokens'
    positions: ``kept`` ids (None: all) plus the panel's genes, in token id order."""
    if kept is None:
        return list(front.genes), None, list(front.special_ids)
    index = {g: i for i, g in enumerate(front.genes)}
    ids = np.union1d(kept, [index[g] for g in panel or [] if g in index]).astype(np.int64)
    gene_index = np.full(len(front.genes), -1, dtype=np.int64)
    gene_index[ids] = np.arange(len(ids))
    special = sorted(int(gene_index[i]) for i in front.special_ids if gene_index[i] >= 0)
    return [front.genes[i] for i in ids], gene_index, special


def _subset_keys(subset_by, groupby: str) -> list[str]:
    keys = [str(k) for k in ([subset_by] if isinstance(subset_by, str) else subset_by or [])]
    if groupby in keys or len(set(keys)) != len(keys):
        raise ValueError(f"--subset-by keys must be distinct and differ from --groupby {groupby!r}, got {keys}")
    return keys


def _checked_gene_sets(gene_sets, genes) -> dict[str, list[str]]:
    """The gene sets as name -> genes, refused before any model work when a set holds none of the run's genes."""
    known = set(map(str, genes or []))
    out = {}
    for name, members in (gene_sets or {}).items():
        members = list(dict.fromkeys(str(g) for g in members))
        if not any(g in known for g in members):
            raise ValueError(f"gene set {name!r} holds none of the run's genes (the data's genes in the vocabulary; "
                             f"{len(members)} genes, e.g. {members[:3]}): use the vocabulary's gene names (e.g. Ensembl "
                             f"ids)")  # fmt: skip
        out[str(name)] = members
    return out


# ----------------------------------------------------------------- helpers
def model_description(model: torch.nn.Module) -> dict:
    """Architecture and a fingerprint of the weights: profiles merge only when made by the same model."""
    config = getattr(model, "config", None)
    # JSON-safe: a transformers config is a dataclass too, with a torch dtype among its fields
    described = json.loads(json.dumps(asdict(config), default=str)) if is_dataclass(config) else {}
    digest = hashlib.blake2b(digest_size=8)
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return {"class": type(model).__name__, **described, "weights": digest.hexdigest()}


@contextmanager
def _opened(adata):
    """An AnnData as given, or a path opened backed (closed after)."""
    if isinstance(adata, (str, Path)):
        path = Path(adata)
        opened = open_h5ad(path)
        try:
            yield opened, str(path)
        finally:
            opened.file.close()
    else:
        source = str(adata.filename) if getattr(adata, "isbacked", False) else "<AnnData in memory>"
        yield adata, source


def _unique(panel):
    if panel is None:
        return None
    return list(dict.fromkeys(str(g) for g in panel))


def _check_options(window: int, context_length: int, chunk_size: int, bucket_size: int, map_bins: int = 0) -> None:
    if not 0 <= map_bins <= context_length:
        raise ValueError(f"map_bins={map_bins} is outside [0, {context_length}]: the maps bin the model's context of "
                         f"{context_length} positions, at most one position per bin; e.g. map_bins=32")  # fmt: skip
    if not 1 <= window <= context_length:
        raise ValueError(
            f"window={window} is outside [1, {context_length}]: the model reads at most {context_length} tokens "
            f"per cell (its context length), so the window must lie within; e.g. window={min(64, context_length)}"
        )
    for name, value in (("chunk_size", chunk_size), ("bucket_size", bucket_size)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1 cell, got {value}")


def _this_shard(shard) -> tuple[tuple[int, int], bool]:
    """(index, count) of this process's shard, and whether it is a rank of a distributed job."""
    rank, world = rank_and_world()
    if world > 1:
        if shard is not None and tuple(shard) != (rank, world):
            raise ValueError(
                f"shard={tuple(shard)} inside a torch.distributed job of {world} ranks: the job shards the cells "
                f"by rank already; drop shard="
            )
        return (rank, world), True
    if shard is None:
        return (0, 1), False
    index, count = (int(x) for x in shard)
    if not 0 <= index < count:
        raise ValueError(f"shard=({index}, {count}) needs 0 <= index < count, e.g. (0, 4) for the first of four")
    return (index, count), False
