"""Deprecated: Nicheformer's tokenizer is :mod:`attnprof.singlecell.nicheformer.tokenizer`; names kept here."""

from ._moved import warn_moved
from .alignment import GeneAlignment, align_genes, count_matrix, gene_names
from .batches import TokenChunk
from .nicheformer.tokenizer import TARGET_SUM, Tokenizer, iter_token_chunks, tokenize_anndata

__all__ = ["TARGET_SUM", "GeneAlignment", "TokenChunk", "Tokenizer", "align_genes", "count_matrix", "gene_names",
           "iter_token_chunks", "tokenize_anndata"]  # fmt: skip
warn_moved("attnprof.singlecell.tokenize", "attnprof.singlecell.nicheformer.tokenizer")
