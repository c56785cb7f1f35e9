"""The model-family seam: how a family tokenizes cells and calls its model.

Every family (Nicheformer, Geneformer, scGPT; see registry.py) is a :class:`FrontEnd`: it replaces the
family-specific steps and leaves the rest of the run (cells, shards, checkpoints, blocks, outputs) as is:

- ``tokenizer.tokenize(block, rows, alignment)``: rows of counts -> per-position codes;
- ``gene_ids(codes)``: the token ids the gene statistics count (``genes[id]`` names them);
- ``inputs(codes)``: the model's keyword arguments for one batch (``forward`` calls it).

Batches are built by the shared :func:`~attnprof.singlecell.batches.make_batches`,
which pads with id 1, so each position travels as one int64 *code*:
``code = 2 + token_id * n_values + (value - min_value)`` (codes 0 and 1 are
never used; 1 marks padding). Geneformer has no values (``n_values = 1``,
``code = token id + 2``); scGPT carries its binned expression value.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from .alignment import align_genes, count_matrix, gene_names
from .batches import TokenChunk
from .vocab import PAD

@dataclass(frozen=True)
class Packing:
    """Token ids and integer values in one int64 code per position (see the module docstring)."""

    min_value: int = 0
    n_values: int = 1

    def pack(self, ids: np.ndarray, values: np.ndarray | None = None) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if values is None:
            return ids * self.n_values + 2
        offset = np.asarray(values, dtype=np.int64) - self.min_value
        if offset.size and (offset.min() < 0 or offset.max() >= self.n_values):
            raise ValueError(f"values outside [{self.min_value}, {self.min_value + self.n_values})")
        return ids * self.n_values + offset + 2

    def unpack(self, codes: torch.Tensor, pad_id: int, pad_value: int = 0):
        """(ids, values, padding) of a batch of codes; padded positions get ``pad_id`` and ``pad_value``."""
        padding = codes == PAD
        shifted = (codes - 2).clamp(min=0)
        ids = torch.where(padding, pad_id, shifted // self.n_values)
        values = torch.where(padding, pad_value, shifted % self.n_values + self.min_value)
        return ids, values, padding


class FrontEnd:
    """One model family's tokenizer and model call (subclasses: each family's front end, and :class:`TokenModel`).

    Attributes set by subclasses: ``name``, ``adapter`` (``hf``, ``mha`` or ``auto``),
    ``tokenizer`` (with ``vocab``, ``draws``, ``start``, ``tokenize`` and ``settings()``), ``genes``
    (token id -> name), ``n_context`` (leading special tokens), ``context_length``.
    """

    name: str
    adapter: str
    n_context: int
    context_length: int
    genes: list[str]
    special_ids: list[int]  # ids of ``genes`` that are no gene (special tokens, unused ids)

    def gene_ids(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def inputs(self, codes: torch.Tensor) -> dict:
        raise NotImplementedError

    #: Cells without vocabulary counts are profiled with their context tokens (Nicheformer), not left out.
    keeps_context_only = False

    def forward(self, model, codes: torch.Tensor):
        return model(**self.inputs(codes))

    def present_ids(self, adata, layer=None, use_raw=False, gene_key=None) -> np.ndarray | None:
        """The token ids this family's tokens of ``adata`` can hold (sorted), or None: the whole vocabulary."""
        return None

    def chunks(self, adata, *, rows, left_out=None, stream_rows=None, **reading) -> Iterator[TokenChunk]:
        """The cells ``rows`` tokenized chunk by chunk (:func:`iter_family_chunks`)."""
        return iter_family_chunks(adata, self, rows=rows, left_out=left_out, stream_rows=stream_rows, **reading)

    def settings(self) -> dict:
        return {"family": self.name, **self.tokenizer.settings()}

    def left_out_message(self, n: int) -> str:
        return f"{n} cells have no counts in vocabulary genes and were left out"


class TokenModel(FrontEnd):
    """A model called on a batch of token ids that are also the gene ids (the default of a run loop)."""

    name = "tokens"
    adapter = "auto"
    keeps_context_only = False

    def gene_ids(self, codes: torch.Tensor) -> torch.Tensor:
        return codes

    def inputs(self, codes: torch.Tensor) -> tuple:
        return (codes,)

    def forward(self, model, codes: torch.Tensor):
        return model(codes)


def iter_family_chunks(
    adata,
    front: FrontEnd,
    *,
    rows: np.ndarray,
    layer: str | None = None,
    use_raw: bool = False,
    gene_key: str | None = None,
    chunk_size: int = 1024,
    left_out=None,
    stream_rows: np.ndarray | None = None,
) -> Iterator[TokenChunk]:
    """Tokenize the cells ``rows`` (sorted) ``chunk_size`` rows at a time, in row order.

    Tokenizers with random draws (scGPT's binning and sampling; ``tokenizer.draws``) consume one
    stream cell by cell, as the family's own code does, over ``stream_rows`` (sorted, a superset of
    ``rows``: all selected cells of a run): the cells of other shards and the cells a resumed run
    has done are tokenized too and dropped, so every cell gets the draws it gets in one whole run.
    Cells the tokenizer gives length 0 are left out of the chunks and counted in ``left_out.n``.
    """
    matrix, var = count_matrix(adata, layer=layer, use_raw=use_raw)
    alignment = align_genes(gene_names(var, gene_key), front.tokenizer.vocab,
                            keep_duplicates=getattr(front.tokenizer, "keeps_duplicates", False))  # fmt: skip
    rows = np.asarray(rows, dtype=np.int64)
    read = rows if stream_rows is None or not front.tokenizer.draws else np.asarray(stream_rows, dtype=np.int64)
    front.tokenizer.start(adata, alignment)
    warned = False
    for start in range(0, matrix.shape[0], chunk_size):
        stop = min(start + chunk_size, matrix.shape[0])
        lo, hi = np.searchsorted(read, [start, stop])
        if lo == hi:
            continue
        tokenized = read[lo:hi]
        block = matrix[start:stop][tokenized - start]  # one contiguous read, as iter_token_chunks
        if not warned and not _integer_valued(block):
            warned = True
            warnings.warn(
                f"the count matrix has non-integer values: {front.name} tokenizes raw counts; if it holds normalized "
                f"or log-transformed data pick the counts with layer= (--layer) or use_raw=True (--use-raw)",
                stacklevel=2,
            )
        codes, lengths = front.tokenizer.tokenize(block, tokenized, alignment)
        wanted = np.isin(tokenized, rows, assume_unique=True)
        kept = wanted & (lengths > 0)
        if left_out is not None:
            left_out.n += int((wanted & (lengths == 0)).sum())
        if kept.any():
            yield TokenChunk(tokenized[kept], codes[kept], lengths[kept])


def _integer_valued(block) -> bool:
    data = block.data if sp.issparse(block) else np.asarray(block)
    return bool(np.all(data == np.round(data)))


def dense(block) -> np.ndarray:
    """A block of rows as a dense ndarray in its own dtype."""
    return block.toarray() if hasattr(block, "toarray") else np.asarray(block)


def nonzero_rows(block, columns: np.ndarray) -> sp.csr_matrix:
    """The ``columns`` of a block of rows as CSR holding only non-zero values, in column order per row.

    What ``np.nonzero`` of each dense row keeps (explicit zeros dropped, duplicates summed as ``toarray``
    would), without densifying a chunk of cells by all genes.
    """
    X = sp.csr_matrix(block)[:, columns]
    X.sum_duplicates()  # also sorts the indices
    X.eliminate_zeros()
    return X


def pad_rows(cells: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Variable-length code rows -> ``[n, width]`` padded with PAD, and their lengths."""
    lengths = np.array([len(c) for c in cells], dtype=np.int64)
    out = np.full((len(cells), max(1, int(lengths.max(initial=0)))), PAD, dtype=np.int64)
    for i, c in enumerate(cells):
        out[i, : len(c)] = c
    return out, lengths
