"""Geneformer's rank-value tokenizer: cells -> the input ids Geneformer's own code makes.

The specification is Geneformer's own ``geneformer/tokenizer.py``
(``TranscriptomeTokenizer.tokenize_anndata`` and ``create_dataset``):

- the library size is the obs column ``n_counts`` (not recomputed), the genes
  are those of the data whose Ensembl id (a var column) is in the token
  dictionary, kept in var-column order;
- ``X / n_counts * 10_000 / median`` left to right, with the dtypes of X, of the ``n_counts`` column
  and of the (float64) medians: in numpy on dense X; on sparse X in scipy's sparse arithmetic, which
  divides by multiplying with the reciprocal (the two differ in the last bit and swap near-ties)
- the non-zero values, in var-column order, ranked by ``np.argsort(-values)``:
  numpy's default (unstable) sort, so ties fall where that sort puts them;
- V1 dictionaries (no ``<cls>``/``<eos>``): the first 2,048 ranked genes; V2
  dictionaries: the first 4,094 between ``<cls>`` and ``<eos>`` (4,096 tokens).

Quirks named, and what attnprof does about them:

- a cell with ``n_counts == 0`` divides 0 by 0: Geneformer ranks NaNs, i.e.
  every gene of the data in the sort's NaN order; attnprof leaves such a cell out;
- a cell with no counts in dictionary genes: V2's ``tokenize_anndata`` drops
  it with a warning, V1's keeps an empty input the model cannot attend over;
  attnprof leaves it out (both: with a warning that counts them);
- Ensembl ids are used as given, as with ``collapse_gene_ids=False``: the
  mapping file that renames and sums ids is not read, duplicates are an error;
- the ``filter_pass`` obs column is not read: select cells with ``subset``.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ..family import Packing, nonzero_rows, pad_rows
from ..vocab import Vocabulary

TARGET_SUM = 10_000  # an int, as in Geneformer: the product keeps the dtype of X / n_counts
SPECIAL = ("<pad>", "<mask>", "<cls>", "<eos>")
#: Input size per model version: V1 (no <cls>/<eos> in the dictionary) and V2.
INPUT_SIZE = {False: 2048, True: 4096}


class GeneformerTokenizer:
    """Cells -> Geneformer input ids, as ``TranscriptomeTokenizer`` makes them.

    token_dict:   Ensembl id -> token id (with ``<pad>``, ``<mask>``; V2 also ``<cls>``, ``<eos>``).
    medians:      Ensembl id -> non-zero median (the gene median dictionary).
    input_size:   tokens per cell (default: 2,048 for V1 dictionaries, 4,096 for V2).
    counts_key:   the obs column with each cell's total counts (Geneformer's ``n_counts``).
    """

    draws = False  # deterministic: no random stream to keep in step

    def __init__(self, token_dict: dict, medians: dict, input_size: int | None = None, counts_key: str = "n_counts"):
        self.token_dict = token_dict
        self.special = "<cls>" in token_dict and "<eos>" in token_dict
        self.input_size = INPUT_SIZE[self.special] if input_size is None else int(input_size)
        minimum = 3 if self.special else 1
        if self.input_size < minimum:
            raise ValueError(f"input_size must be at least {minimum}, got {self.input_size}")
        self.counts_key = counts_key
        genes = [g for g in token_dict if g not in SPECIAL]
        no_median = [g for g in genes if g not in medians]
        if no_median:
            raise ValueError(
                f"{len(no_median)} genes of the token dictionary have no median in the gene median dictionary "
                f"(e.g. {no_median[:3]}): pass the two files of the same Geneformer release"
            )
        self.vocab = Vocabulary(genes, source="the Geneformer token dictionary")
        self.token_of = np.array([token_dict[g] for g in genes], dtype=np.int64)
        self.median_of = np.array([medians[g] for g in genes])  # float64, as np.array of Python floats
        self.packing = Packing()

    def settings(self) -> dict:
        return {"version": "V2" if self.special else "V1", "input_size": self.input_size,
                "counts_key": self.counts_key, "target_sum": TARGET_SUM}  # fmt: skip

    def start(self, adata, alignment) -> None:
        if self.counts_key not in adata.obs.columns:
            raise ValueError(
                f"obs has no column {self.counts_key!r}: Geneformer normalizes by each cell's total counts from "
                f"obs['n_counts']; add it (e.g. adata.obs['n_counts'] = adata.X.sum(axis=1).A1 over all genes) "
                f"or name the column with --counts-key"
            )
        self.n_counts = np.asarray(adata.obs[self.counts_key].values)
        self.columns = alignment.columns
        self.tokens = self.token_of[alignment.vocab_index]
        self.norm = self.median_of[alignment.vocab_index]

    def tokenize(self, block, rows: np.ndarray, alignment) -> tuple[np.ndarray, np.ndarray]:
        """Codes and lengths of the cells; length 0 for the cells left out (see the module docstring)."""
        n_counts = self.n_counts[rows]
        cells = []
        for i, (values, columns) in enumerate(self._normalized(block, n_counts)):
            if n_counts[i] == 0:
                cells.append(np.empty(0, dtype=np.int64))
                continue
            ranked = self.tokens[columns][np.argsort(-values)]  # default (unstable) argsort, as rank_genes
            if ranked.size and self.special:
                ranked = np.concatenate([[self.token_dict["<cls>"]], ranked[: self.input_size - 2],
                                         [self.token_dict["<eos>"]]])  # fmt: skip
            else:
                ranked = ranked[: self.input_size]
            cells.append(self.packing.pack(ranked))
        return pad_rows(cells)

    def _normalized(self, block, n_counts):
        """Per cell, the values Geneformer ranks and their columns (of the aligned genes), as it computes them.

        Dense X: numpy's ``X / n_counts * 10_000 / median`` on the non-zero entries only (the same operations
        on the same dtypes give the same values; zeros are not ranked). Sparse X: Geneformer's expression runs
        on scipy's sparse matrix, where ``X / a`` is ``X.multiply(1 / a)``, so the values are
        X·(1/n_counts)·10,000·(1/median), which differ in the last bit and can swap near-ties: the same
        expression on the same scipy here, then ``csr_matrix`` (entries as it keeps them, explicit zeros too).
        """
        if sp.issparse(block):
            X = sp.csr_matrix(block)[:, self.columns]
            with np.errstate(divide="ignore", invalid="ignore"):  # n_counts 0: those cells are left out
                normed = sp.csr_matrix(X / n_counts[:, None] * TARGET_SUM / self.norm)
            for i in range(normed.shape[0]):
                span = slice(normed.indptr[i], normed.indptr[i + 1])
                yield normed.data[span], normed.indices[span]
            return
        X = nonzero_rows(block, self.columns)
        for i in range(X.shape[0]):
            span = slice(X.indptr[i], X.indptr[i + 1])
            values, columns = X.data[span], X.indices[span]
            with np.errstate(divide="ignore", invalid="ignore"):
                yield values / n_counts[i : i + 1] * TARGET_SUM / self.norm[columns], columns
