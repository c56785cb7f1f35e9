"""The run loop: batches through the model inside one profiling session, per shard and checkpoint.

:func:`profile_batches` runs batches through a model and returns their sums; :class:`CellPlan` names the cells
this process profiles (rows, group and block codes); ``_Run`` reads, batches and profiles them, resuming from a
checkpoint. :func:`attnprof.singlecell.profile_anndata` prepares all of it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch
from tqdm.auto import tqdm

from attnprof.kernels import resolve_backend

from ..checkpoint import Checkpoint
from ..distributed import shard as shard_indices
from ..profile import Profile
from ..session import Profiler
from .batches import Batch, CellSelection, make_batches
from .family import TokenModel


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
    gene_index: np.ndarray | None = None,
    map_bins: int = 0,
) -> Profile:
    """The run loop: every batch through the model inside one profiling session.

    blocks:        the :class:`~attnprof.blocks.Blocks` the sums are kept for (default: pseudo-replicates
                   dealt by the profiler).
    blocks_of:     row positions -> the block code of those cells (-1: not counted).
    after_batch:   called after each forward with the profiler and the batch (e.g. to checkpoint).
    family:        a family front end whose ``gene_ids`` and ``forward`` read the batch's codes (default:
                   the tokens are the model's input and the gene ids, as for Nicheformer).
    map_bins:      bins per axis of the whole-context maps over the family's context length (0: none).
    gene_index:    token id -> its position in ``genes`` (-1: none), when ``genes`` names only the ids the
                   data can hold (default: ``genes`` names every token id).
    """
    family = family or TokenModel()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # dropout off: attention must be the model's deterministic attention
    start = time.perf_counter()
    bar = tqdm(total=n_cells, unit="cells", desc="profiling", disable=not progress, smoothing=0.1)
    try:
        with Profiler(model, groups, window=window, genes=genes, panel=panel, n_context=n_context,
                      backend=backend, meta=meta, adapter=family.adapter, blocks=blocks, map_bins=map_bins,
                      map_length=family.context_length if map_bins else 0) as prof, \
                torch.inference_mode():  # fmt: skip
            for batch in batches:
                tokens = batch.tokens.to(device)
                ids = family.gene_ids(tokens) if gene_index is None else _indexed(gene_index, family, batch).to(device)
                if blocks_of is None:
                    prof.set_batch(groups=batch.codes, tokens=ids)
                else:
                    prof.recorder.set_block_batch(blocks_of(batch.rows), ids)
                family.forward(model, tokens)
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
        return cells_digest(obs_names, self.rows[counted], self.codes[counted], self.groups)


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

    def profile(self, model, adata, plan: CellPlan, meta: dict, ckpt: Checkpoint | None):
        """The profile of the plan's cells (a checkpoint's sums plus the cells it lacks) and the count of cells
        profiled with their context only (Nicheformer) or left out (the other families)."""
        front = self.stats["family"]
        rows = plan.rows if ckpt is None else ckpt.remaining(plan.rows)
        # left-out cells are never done, so a resumed run counts them all again: start at 0
        resumed = ckpt.counters.get("context_only_cells", 0) if ckpt is not None and front.keeps_context_only else 0
        context_only = _Count(resumed)
        chunks = front.chunks(adata, rows=rows, left_out=context_only, stream_rows=self.stream_rows, **self.reading)
        batches = make_batches(chunks if ckpt is None else ckpt.watch(chunks), plan.codes_for, **self.batching)
        batches = _nonempty(batches if ckpt is None else ckpt.skip_done(batches))
        if batches is None and (ckpt is None or ckpt.prior is None):  # the front end left out every cell
            raise ValueError(_all_left_out(front, context_only.n))
        if batches is None:  # the checkpoint holds every cell: the run had finished
            return ckpt.prior, context_only.n

        def after_batch(prof: Profiler, batch: Batch) -> None:
            if front.keeps_context_only:
                context_only.n += front.context_only(batch)
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


def _indexed(gene_index: np.ndarray, family, batch: Batch) -> torch.Tensor:
    """The batch's gene ids as positions in the run's genes (on the CPU, before the batch moves)."""
    ids = gene_index[family.gene_ids(batch.tokens).numpy()]
    if (ids < 0).any():  # the front end's present_ids missed an id its tokens hold: a bug, never a silent drop
        missing = sorted(set(family.gene_ids(batch.tokens).numpy()[ids < 0].tolist()))
        raise RuntimeError(f"token ids {missing[:10]} are not among the run's genes (present_ids of {family.name})")
    return torch.from_numpy(ids)


class _Count:
    """A count the tokenizer and the loop add to (cells left out, or profiled with their context only)."""

    def __init__(self, n: int = 0):
        self.n = int(n)


def _nonempty(items: Iterator) -> Iterator | None:
    """The iterator unchanged, or None when it yields nothing."""
    first = next(items, None)
    return None if first is None else chain([first], items)


def _all_left_out(family, n: int) -> str:
    """Why a run has no cell to profile: its family front end left out every selected one."""
    why = family.left_out_message(n)
    return (
        f"nothing to profile: {why}, which is every selected cell; check where the counts are (--layer, "
        f"--use-raw; Geneformer: --counts-key) and the gene names (--gene-key)"
    )


def cells_digest(obs_names, rows: np.ndarray, codes: np.ndarray, groups: Sequence[str]) -> str:
    """A short hash of which cells (by obs name) are profiled in which group."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update("\n".join(str(g) for g in groups).encode())
    digest.update("\n".join(map(str, obs_names[rows])).encode())
    digest.update(np.ascontiguousarray(codes, dtype=np.int64).tobytes())
    return digest.hexdigest()
