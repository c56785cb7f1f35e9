"""Profile a single-cell model over the cells of an AnnData, grouped by an obs column.

:func:`profile_anndata` is the one call: select cells, tokenize them in
chunks, bucket and trim batches, and run them through the model inside a
:class:`attnprof.Profiler`. It keeps the sums per block (each replicate, or
pseudo-replicates of cells without a replicate key: what a permutation test
relabels at compare time), shards the cells (``shard=``, or by rank inside a
``torch.distributed`` job, whose sums it all-reduces), and saves checkpoints
a rerun resumes from. :func:`profile_batches` is the run loop itself;
:func:`write_outputs` writes a run's folder (profile, tables, figures).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, is_dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from attnprof.kernels import resolve_backend

from ..blocks import PSEUDO_REPLICATES, design_blocks
from ..checkpoint import Checkpoint
from ..distributed import all_reduce_profile, rank_and_world, shard as shard_indices, sum_over_ranks
from ..checks import open_h5ad
from ..profile import Profile, cell_ids
from ..session import Profiler
from .batches import Batch, CellSelection, ordered_values, make_batches, select_cells
from .family import iter_family_chunks
from .tokenize import Tokenizer, count_matrix, gene_names, iter_token_chunks
from .vocab import N_CONTEXT, PAD, Vocabulary, as_vocabulary


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
    window: int = 64,
    batch_size: int = 32,
    chunk_size: int = 1024,
    bucket_size: int = 2048,
    backend: str = "auto",
    trim_padding: bool = True,
    replicate: str | None = None,
    strata: str | None = None,
    subset_by: Sequence[str] | None = None,
    gene_sets: dict[str, Sequence[str]] | None = None,
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
              ``context_length`` and ``forward(tokens)``), run on its own device.
    adata:    an AnnData (in memory or backed) or the path of an ``.h5ad`` (opened backed).
    groupby:  the obs column whose categories are the groups; ``groups`` restricts and orders them.
    vocab:    the model's gene list (Vocabulary, path or names); default: the data's own genes.
    means:    the technology mean vector (array or ``.npy``); default: all ones.
    panel:    gene names whose pairwise attention is summed.
    layer, use_raw, gene_key: where the counts and gene names are (default ``X`` and var names).
    subset:   an obs query, e.g. ``"cell_type == 'neuron'"``.
    species, assay, modality: the context tokens, by name or id.
    tokenization: ``"notebook"`` or ``"dataset"``, the upstream path to reproduce (see tokenize.py).
    window:   position window of the per-head maps (at most the model's context length).
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

    family:   a :class:`~attnprof.singlecell.family.FrontEnd` (Geneformer, scGPT) that tokenizes and calls
              ``model`` in its family's way; ``vocab``, ``means`` and the context tokens are then unused.

    Returns a :class:`attnprof.Profile` with the token names as genes and ``n_context=3``.
    """
    n_tokens, context_length = _model_shape(model) if family is None else (None, family.context_length)
    if permutations is not None:
        warnings.warn("profile_anndata(permutations=...) is ignored: permutations are drawn at compare time from "
                      "the replicate blocks (profile.compare(a, b, permutations=N))", DeprecationWarning, stacklevel=2)  # fmt: skip
    _check_options(window, context_length, chunk_size, bucket_size)
    shard, distributed = _this_shard(shard)
    with _opened(adata) as (adata, source):
        selection = select_cells(adata.obs, groupby, groups=groups, subset=subset)
        if family is None:
            vocab = _model_vocabulary(vocab, adata, layer, use_raw, gene_key, n_tokens)
            tokenizer = Tokenizer(
                vocab, means, context_length=context_length, species=species, assay=assay, modality=modality,
                tokenization=tokenization,
            )
        else:
            tokenizer = family
        obs = adata.obs.iloc[selection.rows]
        subset_by = _subset_keys(subset_by, groupby)
        for key in (replicate, strata, *subset_by):
            if key is not None and key not in adata.obs.columns:
                raise ValueError(f"obs has no column {key!r} (columns: {list(adata.obs.columns)})")
        genes = vocab.token_names() if family is None else family.genes
        gene_sets = _checked_gene_sets(gene_sets, genes)
        blocks, block_codes = design_blocks(
            selection.codes, selection.groups, None if replicate is None else obs[replicate].to_numpy(),
            None if strata is None else obs[strata].to_numpy(), replicate_key=replicate or "replicate",
            strata_key=strata or "strata", per_group=pseudo_replicates, seed=seed,
            subsets={k: obs[k].to_numpy() for k in subset_by} or None,
        )  # fmt: skip
        plan = plan_cells(selection, shard, block_codes)
        names = adata.obs_names
        meta = {
            "special_tokens": vocab.special_ids() if family is None else family.special_ids,  # known by id
            "model": model_description(model),
            "options": {
                "groupby": groupby,
                "tokenizer": tokenizer.settings(),  # a family's: its name and tokenizer settings
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
                       panel=_unique(panel), window=window, n_context=N_CONTEXT if family is None else family.n_context,
                       backend=backend, family=family, blocks=blocks),
            progress=progress and rank_and_world()[0] == 0,
            stream_rows=selection.rows,
        )  # fmt: skip
        whole = None  # names every shard's cells: for a checkpoint's fingerprint and a summed profile
        if checkpoint is not None or distributed:
            whole = _cells_digest(names, selection.rows, selection.codes, selection.groups)
        ckpt = None
        if checkpoint is not None:
            fingerprint = run.fingerprint(meta, whole, shard)
            ckpt = Checkpoint.open(checkpoint, fingerprint, checkpoint_every, shard=shard)
            if ckpt.n_done and rank_and_world()[0] == 0:
                print(f"resuming: {ckpt.n_done} of {sum(plan.counts().values())} cells already done "
                      f"(checkpoint {ckpt.path})", file=sys.stderr, flush=True)  # fmt: skip
        profile, context_only = run.profile(model, adata, tokenizer, plan, meta, ckpt)
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
    if context_only and rank_and_world()[0] == 0:
        warnings.warn(
            f"{context_only} cells have no counts in vocabulary genes and were profiled with only "
            f"their {N_CONTEXT} context tokens" if family is None else family.left_out_message(context_only),
            stacklevel=2,
        )
    if ckpt is not None:
        ckpt.remove()  # the result is complete: a rerun starts afresh
    return profile


def _subset_keys(subset_by, groupby: str) -> list[str]:
    keys = [str(k) for k in ([subset_by] if isinstance(subset_by, str) else subset_by or [])]
    if groupby in keys or len(set(keys)) != len(keys):
        raise ValueError(f"--subset-by keys must be distinct and differ from --groupby {groupby!r}, got {keys}")
    return keys


def _checked_gene_sets(gene_sets, genes) -> dict[str, list[str]]:
    """The gene sets as name -> genes, refused before any model work when a set holds no gene of the model's."""
    known = set(map(str, genes or []))
    out = {}
    for name, members in (gene_sets or {}).items():
        members = list(dict.fromkeys(str(g) for g in members))
        if not any(g in known for g in members):
            raise ValueError(f"gene set {name!r} holds none of the model's genes ({len(members)} genes, e.g. "
                             f"{members[:3]}): use the vocabulary's gene names (e.g. Ensembl ids)")  # fmt: skip
        out[str(name)] = members
    return out


def profile_batches(
    model: torch.nn.Module,
    batches: Iterable[Batch],
    *,
    groups: Sequence[str],
    genes: Sequence[str],
    panel: Sequence[str] | None,
    window: int,
    n_context: int,
    backend: str,
    meta: dict,
    n_cells: int | None = None,
    progress: bool = True,
    blocks=None,
    blocks_of: Callable[[np.ndarray], np.ndarray] | None = None,
    after_batch: Callable[[Profiler, Batch], None] | None = None,
    family=None,
) -> Profile:
    """The run loop: every batch through the model inside one profiling session.

    blocks:        the :class:`~attnprof.blocks.Blocks` the sums are kept for (default: pseudo-replicates
                   dealt by the profiler).
    blocks_of:     row positions -> the block code of those cells (-1: not counted).
    after_batch:   called after each forward with the profiler and the batch (e.g. to checkpoint).
    family:        a family front end whose ``gene_ids`` and ``forward`` read the batch's codes (default:
                   the tokens are the model's input and the gene ids, as for Nicheformer).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # dropout off: attention must be the model's deterministic attention
    start = time.perf_counter()
    bar = tqdm(total=n_cells, unit="cells", desc="profiling", disable=not progress, smoothing=0.1)
    try:
        with Profiler(model, groups, window=window, genes=genes, panel=panel, n_context=n_context,
                      backend=backend, meta=meta, adapter="auto" if family is None else family.adapter,
                      blocks=blocks) as prof, \
                torch.inference_mode():  # fmt: skip
            for batch in batches:
                tokens = batch.tokens.to(device)
                ids = tokens if family is None else family.gene_ids(tokens)
                if blocks_of is None:
                    prof.set_batch(groups=batch.codes, tokens=ids)
                else:
                    prof.recorder.set_block_batch(blocks_of(batch.rows), ids)
                model(tokens) if family is None else family.forward(model, tokens)
                bar.update(len(batch))
                if after_batch is not None:
                    after_batch(prof, batch)
    finally:
        bar.close()
        model.train(was_training)
    profile = prof.profile
    profile.meta["backend_used"] = resolve_backend(backend, device)
    profile.meta["elapsed_s"] = round(time.perf_counter() - start, 3)
    return profile


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


# ------------------------------------------------------------ cells and runs
@dataclass
class CellPlan:
    """The cells this process profiles: sorted row positions, group codes and block codes.

    A code of -1 runs the cell without counting it: an empty shard runs one such cell, so that it
    still has (zero) sums of the run's layout to add to the others.
    """

    rows: np.ndarray
    codes: np.ndarray
    blocks: np.ndarray
    groups: list[str]

    def codes_for(self, rows: np.ndarray) -> np.ndarray:
        return self.codes[np.searchsorted(self.rows, rows)]

    def blocks_for(self, rows: np.ndarray) -> np.ndarray:
        return self.blocks[np.searchsorted(self.rows, rows)]

    def counts(self) -> dict[str, int]:
        counted = self.codes[self.codes >= 0]
        return {g: int(n) for g, n in zip(self.groups, np.bincount(counted, minlength=len(self.groups)))}

    def digest(self, obs_names) -> str | None:
        """Names the counted cells (None for none): merging two profiles of the same cells is refused."""
        counted = self.codes >= 0
        if not counted.any():
            return None
        return _cells_digest(obs_names, self.rows[counted], self.codes[counted], self.groups)


def plan_cells(selection: CellSelection, shard: tuple[int, int], block_codes: np.ndarray) -> CellPlan:
    """The shard's cells with their group and block codes (blocks designed over the whole selection, so
    that the shards' block sums add up to those of one run)."""
    index = shard_indices(len(selection), *shard)
    if not len(index):
        return CellPlan(selection.rows[:1], np.full(1, -1), np.full(1, -1), selection.groups)
    return CellPlan(selection.rows[index], selection.codes[index], np.asarray(block_codes)[index], selection.groups)


@dataclass
class _Run:
    """How one profile_anndata run reads, batches and profiles its cells."""

    reading: dict
    batching: dict
    stats: dict
    progress: bool
    stream_rows: np.ndarray | None = None  # every selected cell: a family's random draws run over them all

    def fingerprint(self, meta: dict, selection_digest: str, shard: tuple[int, int]) -> dict:
        """What a checkpoint must share with this run to be resumed by it (the backend may differ)."""
        data = {k: meta["data"][k] for k in ("source", "n_obs", "subset")}
        options = {**meta["options"], **self.reading, **self.batching}
        options.update({k: self.stats[k] for k in ("groups", "genes", "panel", "window", "n_context")})
        options["genes"] = hashlib.blake2b("\n".join(options["genes"]).encode(), digest_size=8).hexdigest()
        return {"data": {**data, "cells": selection_digest, "shard": list(shard)}, "model": meta["model"],
                "options": options}  # fmt: skip

    def profile(self, model, adata, tokenizer, plan: CellPlan, meta: dict, ckpt: Checkpoint | None):
        """The profile of the plan's cells (a checkpoint's sums plus the cells it lacks) and the context-only count."""
        rows = plan.rows if ckpt is None else ckpt.remaining(plan.rows)
        # a family's left-out cells are never done, so a resumed run counts them all again: start at 0
        resumed = 0 if ckpt is None or self.stats["family"] is not None else ckpt.counters.get("context_only_cells", 0)
        context_only = _ContextOnly(resumed)
        if self.stats["family"] is None:
            chunks = iter_token_chunks(adata, tokenizer, rows=rows, **self.reading)
        else:  # the family's tokenizer; the cells it leaves out are counted instead of context-only cells
            chunks = iter_family_chunks(adata, tokenizer, rows=rows, left_out=context_only,
                                        stream_rows=self.stream_rows, **self.reading)  # fmt: skip
        batches = make_batches(chunks if ckpt is None else ckpt.watch(chunks), plan.codes_for, **self.batching)
        batches = _nonempty(batches if ckpt is None else ckpt.skip_done(batches))
        if batches is None and (ckpt is None or ckpt.prior is None):  # the front end left out every cell
            raise ValueError(_all_left_out(self.stats["family"], context_only.n))
        if batches is None:  # the checkpoint holds every cell: the run had finished
            return ckpt.prior, context_only.n

        def after_batch(prof: Profiler, batch: Batch) -> None:
            if self.stats["family"] is None:
                context_only.add(batch)
            if ckpt is not None:
                ckpt.ran(batch.rows, lambda: (prof.profile, {"context_only_cells": context_only.n}))

        current = profile_batches(
            model, batches, **self.stats, meta=meta, progress=self.progress,
            n_cells=len(plan.rows) - (0 if ckpt is None else ckpt.n_done),
            blocks_of=plan.blocks_for, after_batch=after_batch,
        )  # fmt: skip
        if ckpt is None or ckpt.prior is None:
            return current, context_only.n
        total = ckpt.total(current)
        total.meta["resumed_cells"] = ckpt.n_done
        return total, context_only.n


class _ContextOnly:
    """Counts counted cells that hold only their context tokens (no vocabulary gene had counts)."""

    def __init__(self, n: int = 0):
        self.n = int(n)

    def add(self, batch: Batch) -> None:
        lengths = (batch.tokens != PAD).sum(1).numpy()
        self.n += int(np.sum((lengths == N_CONTEXT) & (np.asarray(batch.codes) >= 0)))


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


def _model_shape(model) -> tuple[int, int]:
    try:
        return int(model.n_tokens), int(model.context_length)
    except AttributeError:
        raise TypeError(
            f"profile_anndata profiles Nicheformer-style models that take token ids and expose n_tokens and "
            f"context_length (attnprof.singlecell.Nicheformer); got {type(model).__name__}"
        ) from None


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


def _check_options(window: int, context_length: int, chunk_size: int, bucket_size: int) -> None:
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


def _model_vocabulary(vocab, adata, layer, use_raw, gene_key, n_tokens: int) -> Vocabulary:
    """The vocabulary (default: the data's genes), checked against the model's embedding size."""
    if vocab is None:
        vocab = Vocabulary(gene_names(count_matrix(adata, layer, use_raw)[1], gene_key), source="the data's genes")
    vocab = as_vocabulary(vocab)
    if vocab.n_tokens != n_tokens:
        raise ValueError(
            f"the vocabulary ({vocab.source}) has {len(vocab)} genes, so the model would need "
            f"n_tokens={vocab.n_tokens}, but it has n_tokens={n_tokens} ({n_tokens - 30} genes): "
            f"pass the gene list the model was trained with"
        )
    return vocab


def _cells_digest(obs_names, rows: np.ndarray, codes: np.ndarray, groups: Sequence[str]) -> str:
    """A short hash of which cells (by obs name) are profiled in which group."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update("\n".join(str(g) for g in groups).encode())
    digest.update("\n".join(map(str, obs_names[rows])).encode())
    digest.update(np.ascontiguousarray(codes, dtype=np.int64).tobytes())
    return digest.hexdigest()


def _nonempty(items: Iterator) -> Iterator | None:
    """The iterator unchanged, or None when it yields nothing."""
    first = next(items, None)
    return None if first is None else chain([first], items)


def _all_left_out(family, n: int) -> str:
    """Why a run has no cell to profile: its family front end left out every selected one."""
    why = family.left_out_message(n) if family is not None else f"{n} cells were left out"
    return (
        f"nothing to profile: {why}, which is every selected cell; check where the counts are (--layer, "
        f"--use-raw; Geneformer: --counts-key) and the gene names (--gene-key)"
    )
