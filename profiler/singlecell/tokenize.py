"""Nicheformer tokenization of an AnnData, streamed chunk by chunk.

Per cell: counts are scaled to 10,000 (library size over all of the data's
genes), divided by the technology mean of each gene, and the non-zero genes
are ranked by that value, highest first. **Ties** (equal float64 values) are
broken by vocabulary order: the gene with the lower vocabulary index comes
first, so the tokens never depend on the data's column order. Each gene
becomes its token id (vocabulary index + 30); the context tokens
``[species, assay, modality]`` are prepended, the sequence is cut to the
context length and padded with id 1.

Genes of the data that are not in the vocabulary are dropped (with a
warning); the library size still counts them, which leaves each cell's
ranking unchanged. A cell with no counts keeps only its three context tokens.

Rows are read ``chunk_size`` at a time with ``matrix[start:stop]``, which
anndata's backed mode (``read_h5ad(path, backed="r")``) serves from disk for
``X`` and ``raw.X``, so a dataset larger than memory streams through.
(anndata loads ``layers`` into memory when it opens a backed file.)
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .vocab import GENE_OFFSET, N_CONTEXT, PAD, as_vocabulary, context_id, load_means

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


def align_genes(data_genes: Sequence[str], vocab) -> GeneAlignment:
    """Map the data's genes onto the vocabulary; warn about the dropped ones, fail if none match."""
    vocab = as_vocabulary(vocab)
    seen, dupes = set(), []
    for g in data_genes:
        if g in seen:
            dupes.append(g)
        seen.add(g)
    if dupes:
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
    means:          technology mean per vocabulary gene (array or ``.npy`` path);
                    None ranks by normalized counts alone (all means 1).
    context_length: tokens per cell including the three context tokens.
    species, assay, modality: context tokens, by name (``"mouse"``, ``"MERFISH"``, ``"spatial"``) or id.
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
    ):
        self.vocab = as_vocabulary(vocab)
        self.means = np.ones(len(self.vocab)) if means is None else load_means(means, len(self.vocab))
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
            "means": hashlib.blake2b(self.means.tobytes(), digest_size=8).hexdigest(),
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
        library = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
        scale = TARGET_SUM / np.where(library == 0, 1.0, library)
        kept = X[:, alignment.columns].tocoo()
        vocab_index = alignment.vocab_index[kept.col]
        value = kept.data * scale[kept.row] / self.means[vocab_index]
        nonzero = value > 0
        row, vocab_index, value = kept.row[nonzero], vocab_index[nonzero], value[nonzero]
        # by cell, then value descending, then vocabulary index ascending (the tie rule)
        order = np.lexsort((vocab_index, -value, row))
        row, vocab_index = row[order], vocab_index[order]
        n_genes = np.bincount(row, minlength=n)
        first = np.concatenate([[0], np.cumsum(n_genes)[:-1]])
        rank = np.arange(row.size) - first[row]
        max_genes = self.context_length - N_CONTEXT
        keep = rank < max_genes
        lengths = N_CONTEXT + np.minimum(n_genes, max_genes)
        tokens = np.full((n, int(lengths.max(initial=N_CONTEXT))), PAD, dtype=np.int64)
        tokens[:, :N_CONTEXT] = self.context
        tokens[row[keep], N_CONTEXT + rank[keep]] = vocab_index[keep] + GENE_OFFSET
        return tokens, lengths


def _as_csr(X) -> sp.csr_matrix:
    """A float64 CSR copy of a chunk of rows, NaN counted as 0 (as Nicheformer does)."""
    if sp.issparse(X):
        X = sp.csr_matrix(X, dtype=np.float64, copy=True)
    else:
        X = sp.csr_matrix(np.nan_to_num(np.asarray(X, dtype=np.float64)))
    X.data = np.nan_to_num(X.data)
    X.eliminate_zeros()
    return X


def _check_counts(X: sp.csr_matrix) -> None:
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
    warned = False
    for start in range(0, n_obs, chunk_size):
        stop = min(start + chunk_size, n_obs)
        lo, hi = np.searchsorted(rows, [start, stop])
        if lo == hi:
            continue  # no wanted cell here: skip the read
        wanted = rows[lo:hi]
        block = matrix[start:stop]  # contiguous read: what backed storage serves fast
        block = block[wanted - start]
        if not warned and not _integer_valued(block):
            warned = True
            warnings.warn(
                "the count matrix has non-integer values: Nicheformer tokenizes raw counts; if it holds "
                "normalized or log-transformed data pick the counts with layer= (--layer) or use_raw=True (--use-raw)",
                stacklevel=2,
            )
        tokens, lengths = tokenizer.tokenize_rows(block, alignment)
        yield TokenChunk(wanted, tokens, lengths)


def _integer_valued(block) -> bool:
    data = block.data if sp.issparse(block) else np.asarray(block)
    data = data[np.isfinite(data)]
    return bool(np.all(data == np.round(data)))


def tokenize_anndata(
    adata,
    vocab,
    means=None,
    *,
    context_length: int = 1500,
    species="mouse",
    assay="MERFISH",
    modality="spatial",
    layer: str | None = None,
    use_raw: bool = False,
    gene_key: str | None = None,
    rows: np.ndarray | None = None,
    chunk_size: int = 1024,
) -> np.ndarray:
    """Token ids ``[cells, context_length]`` of an AnnData (in memory or backed), padded with 1.

    For data larger than memory, iterate :func:`iter_token_chunks` instead.
    """
    tokenizer = Tokenizer(vocab, means, context_length=context_length, species=species, assay=assay, modality=modality)
    n = count_matrix(adata, layer, use_raw)[0].shape[0] if rows is None else len(rows)
    out = np.full((n, context_length), PAD, dtype=np.int64)
    at = 0
    for chunk in iter_token_chunks(
        adata, tokenizer, rows=rows, layer=layer, use_raw=use_raw, gene_key=gene_key, chunk_size=chunk_size
    ):
        out[at : at + len(chunk), : chunk.tokens.shape[1]] = chunk.tokens
        at += len(chunk)
    return out
