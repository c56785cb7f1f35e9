"""Where the counts and gene names are, and which data columns are vocabulary genes (all front ends).

:func:`count_matrix` picks ``X``, ``raw.X`` or a layer; :func:`align_genes` maps
the data's genes onto a vocabulary (Nicheformer first aligns the data to its
vocabulary and leaves the other genes out before normalizing).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .vocab import as_vocabulary


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
