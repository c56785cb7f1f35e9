"""Profile a Nicheformer over the cells of an AnnData, grouped by an obs column.

:func:`profile_anndata` is the one call: select cells, tokenize them in
chunks, bucket and trim batches, and run them through the model inside a
:class:`attnprof.Profiler`. :func:`profile_batches` is the run loop itself;
:func:`write_outputs` writes a run's folder (profile, tables, figures).
"""

from __future__ import annotations

import hashlib
import time
import warnings
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from attnprof.kernels import resolve_backend

from ..profile import Profile
from ..session import Profiler
from .batches import Batch, make_batches, select_cells
from .tokenize import Tokenizer, count_matrix, gene_names, iter_token_chunks
from .vocab import N_CONTEXT, Vocabulary, as_vocabulary


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
    window: int = 64,
    batch_size: int = 32,
    chunk_size: int = 1024,
    bucket_size: int = 2048,
    backend: str = "auto",
    trim_padding: bool = True,
    progress: bool = True,
) -> Profile:
    """Group-wise attention sums of a Nicheformer over the cells of ``adata``.

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
    window:   position window of the per-head maps.
    trim_padding: cut each batch to its longest cell (same results, less work).

    Returns a :class:`attnprof.Profile` with the token names as genes and ``n_context=3``.
    """
    n_tokens, context_length = _model_shape(model)
    with _opened(adata) as (adata, source):
        selection = select_cells(adata.obs, groupby, groups=groups, subset=subset)
        if vocab is None:
            vocab = Vocabulary(gene_names(count_matrix(adata, layer, use_raw)[1], gene_key), source="the data's genes")
        vocab = as_vocabulary(vocab)
        if vocab.n_tokens != n_tokens:
            raise ValueError(
                f"the vocabulary ({vocab.source}) has {len(vocab)} genes, so the model would need "
                f"n_tokens={vocab.n_tokens}, but it has n_tokens={n_tokens} ({n_tokens - 30} genes): "
                f"pass the gene list the model was trained with"
            )
        tokenizer = Tokenizer(
            vocab, means, context_length=context_length, species=species, assay=assay, modality=modality
        )
        chunks = iter_token_chunks(
            adata, tokenizer, rows=selection.rows, layer=layer, use_raw=use_raw, gene_key=gene_key,
            chunk_size=chunk_size,
        )  # fmt: skip
        context_only = []  # cells with no vocabulary gene counted: only their context tokens
        chunks = _counting_context_only(chunks, context_only)
        batches = make_batches(
            chunks, selection.codes_for, batch_size=batch_size, bucket_size=bucket_size, trim=trim_padding,
            pad_to=context_length,
        )  # fmt: skip
        meta = {
            "model": model_description(model),
            "options": {
                "groupby": groupby,
                "tokenizer": tokenizer.settings(),
                "counts": {"layer": layer, "use_raw": bool(use_raw), "gene_key": gene_key},
            },
            "data": {"source": source, "n_obs": int(adata.n_obs), "subset": subset, "cells": selection.counts()},
        }
        profile = profile_batches(
            model, batches, groups=selection.groups, genes=vocab.token_names(), panel=_unique(panel),
            window=window, n_context=N_CONTEXT, backend=backend, meta=meta, n_cells=len(selection),
            progress=progress,
        )  # fmt: skip
    if sum(context_only):
        warnings.warn(
            f"{sum(context_only)} cells have no counts in vocabulary genes and were profiled with only "
            f"their {N_CONTEXT} context tokens",
            stacklevel=2,
        )
    profile.meta["data"]["context_only_cells"] = int(sum(context_only))
    return profile


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
) -> Profile:
    """The run loop: every batch through the model inside one profiling session."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # dropout off: attention must be the model's deterministic attention
    start = time.perf_counter()
    bar = tqdm(total=n_cells, unit="cells", desc="profiling", disable=not progress, smoothing=0.1)
    try:
        with Profiler(model, groups, window=window, genes=genes, panel=panel, n_context=n_context,
                      backend=backend, meta=meta) as prof, torch.inference_mode():  # fmt: skip
            for batch in batches:
                tokens = batch.tokens.to(device)
                prof.set_batch(groups=batch.codes, tokens=tokens)
                model(tokens)
                bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    profile = prof.profile
    profile.meta["backend_used"] = resolve_backend(backend, device)
    profile.meta["elapsed_s"] = round(time.perf_counter() - start, 3)
    return profile


def write_outputs(profile: Profile, a, b, out, *, min_cells: int = 1, figures: bool = True) -> dict:
    """Write a run's folder: ``profile.npz``, ``tables/`` (CSV, Parquet, genes.h5ad) and ``figures/``.

    Returns the comparison of ``a`` minus ``b`` and the written paths.
    """
    out = Path(out)
    comparison = profile.compare(a, b, min_cells=min_cells)
    profile.meta["contrast"] = {"a": comparison.a, "b": comparison.b, "min_cells": int(min_cells)}
    written = {"profile": profile.save(out / "profile.npz"), "tables": comparison.save(out / "tables")}
    if figures:
        from ..plots import save_figures

        written["figures"] = save_figures(profile, comparison, out / "figures")
    return {"comparison": comparison, "paths": written}


# ----------------------------------------------------------------- helpers
def model_description(model: torch.nn.Module) -> dict:
    """Architecture and a fingerprint of the weights: profiles merge only when made by the same model."""
    config = getattr(model, "config", None)
    described = asdict(config) if is_dataclass(config) else {}
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
        import anndata as ad

        path = Path(adata)
        if not path.exists():
            raise FileNotFoundError(f"data file {path} does not exist")
        opened = ad.read_h5ad(path, backed="r")
        try:
            yield opened, str(path)
        finally:
            opened.file.close()
    else:
        source = str(adata.filename) if getattr(adata, "isbacked", False) else "<AnnData in memory>"
        yield adata, source


def _counting_context_only(chunks, counter: list):
    for chunk in chunks:
        counter.append(int(np.sum(chunk.lengths == N_CONTEXT)))
        yield chunk


def _unique(panel):
    if panel is None:
        return None
    return list(dict.fromkeys(str(g) for g in panel))
