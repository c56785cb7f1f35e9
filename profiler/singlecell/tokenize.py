"""Nicheformer tokenization of an AnnData, streamed chunk by chunk, equal to Nicheformer's own tokens.

Nicheformer's public code is the specification, quirks included. Per cell:
the counts of the vocabulary genes (genes outside it are dropped *before*
normalizing: upstream first aligns the data to the vocabulary) are scaled
to 10,000 (``sf_normalize``, in float64: see :func:`_as_csr`), divided by the
technology mean of each gene, and every gene whose value is not 0 is ranked
by ``np.argsort(-value)`` compiled by numba. Each gene becomes its token id
(vocabulary index + 30); the context tokens ``[species, assay, modality]``
are prepended, the sequence is cut to the context length and padded with 1.

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

import hashlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .argsort import SMALL_QUICKSORT, argsort_segments, compiled_available
from .counts import expm1, inspect_counts, read_rows
from .vocab import GENE_OFFSET, N_CONTEXT, PAD, TOKENIZATIONS, as_vocabulary, context_id, load_means, technology_means

TARGET_SUM = 10_000.0


# ------------------------------------------------------------------ the counts
def count_matrix(adata, layer: str | None = None, use_raw: bool = False):
    """The count matrix to tokenize and its gene names: ``X``, ``raw.X`` or a layer."""
    if use_raw and layer is not None:
        raise ValueError("choose one source of counts: use_raw=True (--use-raw) or layer= (--layer), not both")
    if use_raw:
        if adata.raw is None:
            raise ValueError("use_raw was asked but this AnnData has no .raw: drop --use-raw or pick --layer")
        return adata.raw.X, adata.raw.var
    if layer is not None:
        if layer not in adata.layers:
            raise ValueError(f"this AnnData has no layer {layer!r}; its layers are: {list(adata.layers) or 'none'}")
        return adata.layers[layer], adata.var
    if adata.X is None:
        raise ValueError(f"this AnnData has no X; pick the counts with layer= (--layer), layers: {list(adata.layers)}")
    return adata.X, adata.var


def gene_names(var: pd.DataFrame, gene_key: str | None = None) -> list[str]:
    """The data's gene names: var names, or a var column (e.g. Ensembl ids next to symbols)."""
    if gene_key is None:
        return [str(g) for g in var.index]
    if gene_key not in var.columns:
        raise ValueError(f"var has no column {gene_key!r} for gene names; its columns are: {list(var.columns)}")
    return [str(g) for g in var[gene_key]]


@dataclass
class GeneAlignment:
    """Which data columns are tokenized, and their vocabulary indices."""

    columns: np.ndarray  # data column indices kept
    vocab_index: np.ndarray  # their vocabulary indices
    n_data_genes: int

    @property
    def by_vocab(self) -> np.ndarray:
        """Positions of ``columns`` in vocabulary order."""
        return np.argsort(self.vocab_index, kind="stable")


def align_genes(data_genes: Sequence[str], vocab, keep_duplicates: bool = False) -> GeneAlignment:
    """Map the data's genes onto the vocabulary; warn about the dropped ones, fail if none match.

    keep_duplicates: a name given twice keeps both columns under the same vocabulary gene, as scGPT maps
    them (with a warning); otherwise it is an error.
    """
    vocab = as_vocabulary(vocab)
    seen, dupes = set(), []
    for g in data_genes:
        if g in seen:
            dupes.append(g)
        seen.add(g)
    if dupes and keep_duplicates:
        warnings.warn(
            f"the data names {len(dupes)} genes more than once (e.g. {dupes[:5]}): as scGPT does, every such "
            f"column is tokenized under the same gene id",
            stacklevel=2,
        )
    elif dupes:
        raise ValueError(
            f"the data names {len(dupes)} genes more than once (e.g. {dupes[:5]}): make them unique "
            f"(adata.var_names_make_unique()) or pick another var column with gene_key= (--gene-key)"
        )
    columns, vocab_index, missing = [], [], []
    for j, g in enumerate(data_genes):
        i = vocab.index.get(g)
        if i is None:
            missing.append(g)
        else:
            columns.append(j)
            vocab_index.append(i)
    n = len(data_genes)
    if not columns:
        raise ValueError(
            f"none of the data's {n} genes (e.g. {list(data_genes[:5])}) is in the vocabulary of "
            f"{len(vocab)} genes (e.g. {vocab.genes[:5]}) from {vocab.source}: check that both use the same "
            f"gene identifiers (symbols vs Ensembl ids) or pick the var column that matches with gene_key= (--gene-key)"
        )
    if missing:
        warnings.warn(
            f"{len(missing)} of the data's {n} genes are not in the vocabulary and are dropped "
            f"({len(columns)} are tokenized); e.g. {missing[:5]}",
            stacklevel=2,
        )
    return GeneAlignment(np.asarray(columns, dtype=np.int64), np.asarray(vocab_index, dtype=np.int64), n)


# ------------------------------------------------------------- the tokenizer
class Tokenizer:
    """Turns rows of a count matrix into Nicheformer token ids.

    vocab:          the model's gene list (Vocabulary, path or names).
    means:          technology mean per vocabulary gene (array or ``.npy`` path), as
                    published (NaN and negative entries allowed); None: all ones.
    context_length: tokens per cell including the three context tokens.
    species, assay, modality: context tokens, by name (``"mouse"``, ``"Xenium"``) or id (``9``, ``"9"``).
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
    ):
        self.vocab = as_vocabulary(vocab)
        if tokenization not in TOKENIZATIONS:
            raise ValueError(f"unknown tokenization {tokenization!r}; choose one of: {', '.join(TOKENIZATIONS)}")
        self.tokenization = tokenization
        raw = np.ones(len(self.vocab)) if means is None else load_means(means, len(self.vocab))
        self.raw_means = raw
        self.means = technology_means(raw, tokenization)
        self.nan_genes = np.flatnonzero(np.isnan(self.means))  # dataset path: ranked NaN in every cell
        if context_length <= N_CONTEXT:
            raise ValueError(f"context_length must exceed the {N_CONTEXT} context tokens, got {context_length}")
        self.context_length = int(context_length)
        self.context = np.array(
            [context_id("species", species), context_id("assay", assay), context_id("modality", modality)],
            dtype=np.int64,
        )

    def settings(self) -> dict:
        """What must agree between shards for their profiles to merge (JSON-serializable)."""
        return {
            "vocabulary": self.vocab.digest(),
            "n_genes": len(self.vocab),
            "means": hashlib.blake2b(self.raw_means.tobytes(), digest_size=8).hexdigest(),
            "tokenization": self.tokenization,
            "context": self.context.tolist(),
            "context_length": self.context_length,
        }

    def tokenize_rows(self, X, alignment: GeneAlignment) -> tuple[np.ndarray, np.ndarray]:
        """Tokens ``[n, width]`` (int64, padded with 1) and real lengths ``[n]`` for rows of counts.

        ``width`` is the longest cell of these rows (at most the context length).
        """
        X = _as_csr(X)
        _check_counts(X)
        n = X.shape[0]
        # the vocabulary genes (upstream aligns before normalizing), each cell's in vocabulary order
        kept = X[:, alignment.columns[alignment.by_vocab]]
        kept.sort_indices()
        row = np.repeat(np.arange(n), np.diff(kept.indptr))
        vocab_index = alignment.vocab_index[alignment.by_vocab][kept.indices]
        counts = kept.data
        # sf_normalize: counts += counts == 0; scaled = x * (10000. / counts)
        library = _library(counts, row, vocab_index, n, len(self.vocab), dense=self.tokenization == "dataset")
        library += library == 0
        value = counts * (TARGET_SUM / library)[row] / self.means[vocab_index]
        if self.nan_genes.size:  # x / NaN is NaN for every cell and gene, counted or not
            has_mean = ~np.isnan(self.means[vocab_index])
            row = np.concatenate([row[has_mean], np.repeat(np.arange(n), self.nan_genes.size)])
            vocab_index = np.concatenate([vocab_index[has_mean], np.tile(self.nan_genes, n)])
            value = np.concatenate([value[has_mean], np.full(n * self.nan_genes.size, np.nan)])
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
        tokens[:, :N_CONTEXT] = self.context
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
@dataclass
class TokenChunk:
    """Tokens of some cells: their row positions in the AnnData, tokens ``[n, width]``, lengths."""

    rows: np.ndarray
    tokens: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)


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
    """Tokenize the cells ``rows`` (sorted positions; default all) reading ``chunk_size`` rows at a time."""
    matrix, var = count_matrix(adata, layer=layer, use_raw=use_raw)
    alignment = align_genes(gene_names(var, gene_key), tokenizer.vocab)
    n_obs = matrix.shape[0]
    rows = np.arange(n_obs) if rows is None else np.asarray(rows, dtype=np.int64)
    if rows.size and (np.any(np.diff(rows) <= 0) or rows[0] < 0 or rows[-1] >= n_obs):
        raise ValueError(f"rows must be sorted, unique positions in [0, {n_obs})")
    names = gene_names(var)
    reading = inspect_counts(adata, matrix, rows, chunk_size, names)  # refuses bad counts before the work
    for wanted, block in read_rows(matrix, rows, chunk_size):
        if reading == "expm1":
            block = expm1(block)
        tokens, lengths = tokenizer.tokenize_rows(block, alignment)
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
    layer: str | None = None,
    use_raw: bool = False,
    gene_key: str | None = None,
    rows: np.ndarray | None = None,
    chunk_size: int = 1024,
) -> np.ndarray:
    """Token ids ``[cells, context_length]`` of an AnnData (in memory or backed), padded with 1.

    For data larger than memory, iterate :func:`iter_token_chunks` instead.
    """
    tokenizer = Tokenizer(
        vocab, means, context_length=context_length, species=species, assay=assay, modality=modality,
        tokenization=tokenization,
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
