"""Nicheformer tokenization of an AnnData, streamed chunk by chunk, equal to Nicheformer's own tokens.

Nicheformer's public code is the specification, quirks included. Per cell:
the counts of the vocabulary genes (genes outside it are dropped *before*
normalizing: upstream first aligns the data to the vocabulary) are scaled
to 10,000 (``sf_normalize``, in float64: see :func:`_as_csr`), divided by the
technology mean of each gene, and every gene whose value is not 0 is ranked
by ``np.argsort(-value)`` compiled by numba. Each gene becomes its token id
(vocabulary index + 30); the context tokens ``[species, assay, modality]``
are prepended, the sequence is cut to the context length and padded with 1.

Several technologies in one run (:mod:`.technologies`): each cell's context
may come from obs columns (``species_key``, ``assay_key``, ``modality_key``) and
each cell is divided by its own technology's means, as upstream tokenizes each
technology alone; every step is per cell, so a mixed chunk needs no loop over
cells (only over technologies, for the dataset path's NaN-mean genes).

The division is a true division on both paths: the notebooks divide a
sparse matrix by the means, which the scipy of their time computed as
``np.true_divide(X.todense(), means)`` (today's scipy multiplies by ``1 / means``,
which rounds differently and returns a type upstream's numba loop rejects).

Two upstream paths differ in the means (``tokenization=``):

* ``"notebook"`` (default): the tokenization notebooks, which made the
  pretraining tokens: NaN means -> 0, rounded half up, 0 -> 1.
* ``"dataset"``: ``NicheformerDataset``: only 0 -> 1. A NaN mean makes
  the gene's value NaN in *every* cell (0 / NaN is NaN, and NaN is "not 0"),
  so all NaN-mean genes follow the expressed genes, in numba's NaN-last order.

Negative means (the published MERFISH file has 48) give negative values on
both paths, ranked after the positive ones. **Ties** are ordered as numba's
quicksort orders them (see :mod:`.argsort`), which is not index order once
a cell has 16 or more ranked genes. A cell with no counts keeps only its
context tokens (plus the NaN-mean genes on the dataset path).

Rows are read ``chunk_size`` at a time with ``matrix[start:stop]``, which
anndata's backed mode (``read_h5ad(path, backed="r")``) serves from disk for
``X`` and ``raw.X``, so a dataset larger than memory streams through.
(anndata loads ``layers`` into memory when it opens a backed file.) One
pass over the cells first checks the counts (:mod:`.counts`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp

from ..alignment import GeneAlignment, align_genes, count_matrix, gene_names
from ..batches import TokenChunk
from ..vocab import GENE_OFFSET, N_CONTEXT, PAD, as_vocabulary, context_id
from .argsort import SMALL_QUICKSORT, argsort_segments, compiled_available
from .counts import expm1, inspect_counts, read_rows
from .technologies import TOKENIZATIONS, TechnologyMeans, means_entries, obs_context

TARGET_SUM = 10_000.0


# ------------------------------------------------------------- the tokenizer
class Tokenizer:
    """Turns rows of a count matrix into Nicheformer token ids.

    vocab:          the model's gene list (Vocabulary, path or names).
    means:          technology mean per vocabulary gene (array or ``.npy`` path), as published
                    (NaN and negative entries allowed); None: all ones. Several technologies: a
                    mapping ``{assay or "dissociated": array or path}``, a folder of the published
                    ``*_mean_script.npy`` files, or ``--means`` values (:mod:`.technologies`).
    context_length: tokens per cell including the three context tokens.
    species, assay, modality: context tokens, by name (``"mouse"``, ``"Xenium"``) or id (``9``, ``"9"``).
    species_key, assay_key, modality_key: obs columns holding each cell's context (names or ids);
                    a key overrides the run-wide value (:meth:`cell_context`).
    tokenization:   which upstream path to reproduce, ``"notebook"`` or ``"dataset"`` (module docstring).
    """

    def __init__(
        self,
        vocab,
        means=None,
        *,
        context_length: int = 1500,
        species="mouse",
        assay="MERFISH",
        modality="spatial",
        tokenization: str = "notebook",
        species_key: str | None = None,
        assay_key: str | None = None,
        modality_key: str | None = None,
    ):
        self.vocab = as_vocabulary(vocab)
        if tokenization not in TOKENIZATIONS:
            raise ValueError(f"unknown tokenization {tokenization!r}; choose one of: {', '.join(TOKENIZATIONS)}")
        self.tokenization = tokenization
        self.technologies = TechnologyMeans(means_entries(means), len(self.vocab), tokenization)
        single = self.technologies.single  # one vector: its arrays, as before; else see self.technologies
        self.raw_means = self.technologies.raw[0] if single else None
        self.means = self.technologies.prepared[0] if single else None
        self.nan_genes = self.technologies.nan_genes[0] if single else None  # dataset path: NaN in every cell
        if context_length <= N_CONTEXT:
            raise ValueError(f"context_length must exceed the {N_CONTEXT} context tokens, got {context_length}")
        self.context_length = int(context_length)
        self.context = np.array(
            [context_id("species", species), context_id("assay", assay), context_id("modality", modality)],
            dtype=np.int64,
        )
        self.context_keys = {"species": species_key, "assay": assay_key, "modality": modality_key}
        if assay_key is None and modality_key is None:
            self.technologies.check(self.context)  # the run-wide context needs means now

    @property
    def per_cell(self) -> bool:
        """Whether obs columns give the cells' context (:meth:`cell_context`)."""
        return any(key is not None for key in self.context_keys.values())

    def cell_context(self, obs) -> np.ndarray:
        """Each cell's ``[species, assay, modality]`` ids (``[n, 3]``) from ``obs`` (rows of ``adata.obs``).

        Refuses unknown or missing values, and cells whose technology has no means, before any work.
        """
        context = obs_context(obs, self.context_keys, self.context)
        self.technologies.check(context)
        return context

    def settings(self) -> dict:
        """What must agree between shards for their profiles to merge (JSON-serializable)."""
        settings = {
            "vocabulary": self.vocab.digest(),
            "n_genes": len(self.vocab),
            "means": self.technologies.settings(),  # a digest; several technologies: file and digest each
            "tokenization": self.tokenization,
            "context": self.context.tolist(),
            "context_length": self.context_length,
        }
        if self.per_cell:  # only then: profiles of runs without keys still merge with older ones
            settings["context_keys"] = dict(self.context_keys)
        return settings

    def tokenize_rows(self, X, alignment: GeneAlignment, context=None) -> tuple[np.ndarray, np.ndarray]:
        """Tokens ``[n, width]`` (int64, padded with 1) and real lengths ``[n]`` for rows of counts.

        ``width`` is the longest cell of these rows (at most the context length). ``context``: each row's
        ``[species, assay, modality]`` ids (``[n, 3]``, :meth:`cell_context`); default: the run-wide ones.
        Each cell is divided by the means of its technology.
        """
        X = _as_csr(X)
        _check_counts(X)
        n = X.shape[0]
        context = self.context if context is None else np.asarray(context, dtype=np.int64).reshape(n, N_CONTEXT)
        tech = self.technologies.check(np.broadcast_to(context, (n, N_CONTEXT)))
        # the vocabulary genes (upstream aligns before normalizing), each cell's in vocabulary order
        kept = X[:, alignment.columns[alignment.by_vocab]]
        kept.sort_indices()
        row = np.repeat(np.arange(n), np.diff(kept.indptr))
        vocab_index = alignment.vocab_index[alignment.by_vocab][kept.indices]
        counts = kept.data
        # sf_normalize: counts += counts == 0; scaled = x * (10000. / counts)
        library = _library(counts, row, vocab_index, n, len(self.vocab), dense=self.tokenization == "dataset")
        library += library == 0
        means = self.technologies.divisor(tech, row, vocab_index)  # each cell its technology's
        value = counts * (TARGET_SUM / library)[row] / means
        if self.technologies.any_nan:  # x / NaN is NaN for every cell and gene, counted or not
            has_mean = ~np.isnan(means)
            nan_row, nan_gene = self.technologies.nan_entries(tech)
            row = np.concatenate([row[has_mean], nan_row])
            vocab_index = np.concatenate([vocab_index[has_mean], nan_gene])
            value = np.concatenate([value[has_mean], np.full(nan_row.size, np.nan)])
            order = np.lexsort((vocab_index, row))  # back to each cell's genes in vocabulary order
            row, vocab_index, value = row[order], vocab_index[order], value[order]
        ranked = value != 0  # np.nonzero(cell): NaN counts as non-zero, -0.0 does not
        row, vocab_index, keys = row[ranked], vocab_index[ranked], -value[ranked]  # upstream's argsort input
        order = _numba_order(row, keys, n)
        row, vocab_index = row[order], vocab_index[order]
        n_genes = np.bincount(row, minlength=n)
        first = np.cumsum(n_genes) - n_genes  # each cell's start; empty for no cells
        rank = np.arange(row.size) - first[row]
        max_genes = self.context_length - N_CONTEXT
        keep = rank < max_genes
        lengths = N_CONTEXT + np.minimum(n_genes, max_genes)
        tokens = np.full((n, int(lengths.max(initial=N_CONTEXT))), PAD, dtype=np.int64)
        tokens[:, :N_CONTEXT] = context
        tokens[row[keep], N_CONTEXT + rank[keep]] = vocab_index[keep] + GENE_OFFSET
        return tokens, lengths


def _numba_order(row: np.ndarray, keys: np.ndarray, n: int) -> np.ndarray:
    """Positions putting each cell's ``keys`` (cells contiguous) in numba's ``np.argsort`` order.

    With numba installed every cell goes through the compiled quicksort. Without
    it, cells without tied keys, or with fewer than 16 (numba then runs only its
    stable insertion sort), have one possible order: one vectorized stable sort
    (NaN last, as numba); only the rest go through the Python quicksort.
    """
    n_genes = np.bincount(row, minlength=n)
    first = np.cumsum(n_genes) - n_genes  # each cell's start (np.concatenate([[0], ...]) has one for no cells)
    if compiled_available():
        return argsort_segments(keys, first, first + n_genes)
    order = np.lexsort((np.arange(row.size), keys, row))
    k, r = keys[order], row[order]
    tie = (r[1:] == r[:-1]) & ((k[1:] == k[:-1]) | (np.isnan(k[1:]) & np.isnan(k[:-1])))
    tied = np.unique(r[1:][tie])
    tied = tied[n_genes[tied] > SMALL_QUICKSORT]
    if tied.size:
        quick = argsort_segments(keys, first[tied], first[tied] + n_genes[tied])
        at = np.isin(row, tied)  # a cell's positions are the same in both orders
        order[at] = quick[at]
    return order


def _library(counts, row, vocab_index, n: int, n_vocab: int, dense: bool) -> np.ndarray:
    """Each cell's total over the vocabulary genes, summed as upstream sums its rows (float64).

    Integer totals below 2**53 are exact in any order. Other values are summed
    as upstream does: the notebooks by scipy over sparse rows in vocabulary
    order, ``NicheformerDataset`` by numpy's pairwise sum over dense rows.
    """
    totals = np.bincount(row, weights=counts, minlength=n)
    if np.all(counts == np.round(counts)) and totals.max(initial=0) < 2.0**53:
        return totals
    if not dense:
        rows = sp.csr_matrix((counts, vocab_index, np.searchsorted(row, np.arange(n + 1))), shape=(n, n_vocab))
        return np.asarray(rows.sum(axis=1), dtype=np.float64).ravel()
    library = np.empty(n)
    step = max(1, 2**21 // n_vocab)  # rows per dense block: a few MB at a time
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        block = np.zeros((hi - lo, n_vocab))
        at = (row >= lo) & (row < hi)
        block[row[at] - lo, vocab_index[at]] = counts[at]
        library[lo:hi] = block.sum(axis=1)
    return library


def _as_csr(X) -> sp.csr_matrix:
    """A float64 CSR copy of a chunk of rows.

    float64 because upstream aligns the data to the vocabulary with
    ``ad.concat([model, data])``, and model.h5ad's float64 X makes the
    concatenated counts float64.
    """
    X = sp.csr_matrix(X, dtype=np.float64, copy=True) if sp.issparse(X) else sp.csr_matrix(np.asarray(X, np.float64))
    X.sum_duplicates()
    X.eliminate_zeros()
    return X


def _check_counts(X: sp.csr_matrix) -> None:
    if not np.isfinite(X.data).all():
        raise ValueError("the counts hold NaN or Inf values: repair the data (e.g. np.nan_to_num) first")
    if X.data.size and X.data.min() < 0:
        raise ValueError(
            f"the count matrix has negative values (min {X.data.min():.3g}): tokenization needs raw counts; "
            f"pick them with layer= (--layer) or use_raw=True (--use-raw)"
        )


# ------------------------------------------------------------------ streaming
def iter_token_chunks(
    adata,
    tokenizer: Tokenizer,
    *,
    rows: np.ndarray | None = None,
    layer: str | None = None,
    use_raw: bool = False,
    gene_key: str | None = None,
    chunk_size: int = 1024,
) -> Iterator[TokenChunk]:
    """Tokenize the cells ``rows`` (sorted positions; default all) reading ``chunk_size`` rows at a time.

    With the tokenizer's obs keys, every cell's context and technology are resolved (and checked) once,
    before the counts are read, and each chunk gets its cells' rows of them.
    """
    matrix, var = count_matrix(adata, layer=layer, use_raw=use_raw)
    alignment = align_genes(gene_names(var, gene_key), tokenizer.vocab)
    n_obs = matrix.shape[0]
    rows = np.arange(n_obs) if rows is None else np.asarray(rows, dtype=np.int64)
    if rows.size and (np.any(np.diff(rows) <= 0) or rows[0] < 0 or rows[-1] >= n_obs):
        raise ValueError(f"rows must be sorted, unique positions in [0, {n_obs})")
    # each cell's context and technology, checked for every cell before the work (None: the run-wide ones)
    context = tokenizer.cell_context(adata.obs.iloc[rows]) if tokenizer.per_cell else None
    names = gene_names(var)
    reading = inspect_counts(adata, matrix, rows, chunk_size, names)  # refuses bad counts before the work
    for wanted, block in read_rows(matrix, rows, chunk_size):
        if reading == "expm1":
            block = expm1(block)
        chunk_context = None if context is None else context[np.searchsorted(rows, wanted)]
        tokens, lengths = tokenizer.tokenize_rows(block, alignment, chunk_context)
        yield TokenChunk(wanted, tokens, lengths)


def tokenize_anndata(
    adata,
    vocab,
    means=None,
    *,
    context_length: int = 1500,
    species="mouse",
    assay="MERFISH",
    modality="spatial",
    tokenization: str = "notebook",
    species_key: str | None = None,
    assay_key: str | None = None,
    modality_key: str | None = None,
    layer: str | None = None,
    use_raw: bool = False,
    gene_key: str | None = None,
    rows: np.ndarray | None = None,
    chunk_size: int = 1024,
) -> np.ndarray:
    """Token ids ``[cells, context_length]`` of an AnnData (in memory or backed), padded with 1.

    For data larger than memory, iterate :func:`iter_token_chunks` instead. ``*_key``: obs columns of each
    cell's context; ``means`` per technology: see :class:`Tokenizer`.
    """
    tokenizer = Tokenizer(
        vocab, means, context_length=context_length, species=species, assay=assay, modality=modality,
        tokenization=tokenization, species_key=species_key, assay_key=assay_key, modality_key=modality_key,
    )
    n = count_matrix(adata, layer, use_raw)[0].shape[0] if rows is None else len(rows)
    out = np.full((n, context_length), PAD, dtype=np.int64)
    at = 0
    for chunk in iter_token_chunks(
        adata, tokenizer, rows=rows, layer=layer, use_raw=use_raw, gene_key=gene_key, chunk_size=chunk_size
    ):
        out[at : at + len(chunk), : chunk.tokens.shape[1]] = chunk.tokens
        at += len(chunk)
    return out
