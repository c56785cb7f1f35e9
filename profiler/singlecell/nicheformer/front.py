"""The Nicheformer front end, a model family like the others: its tokenizer and its model call.

The tokens are both the model's input and the ids the gene statistics count; a cell with no count in a
vocabulary gene is still profiled, with only its context tokens (upstream tokenizes it so), and counted.
"""

from __future__ import annotations

import warnings

import numpy as np

from ..alignment import align_genes, count_matrix, gene_names
from ..family import TokenModel
from ..vocab import GENE_OFFSET, N_CONTEXT, PAD, Vocabulary, as_vocabulary
from .tokenizer import Tokenizer, iter_token_chunks


class NicheformerFront(TokenModel):
    """Nicheformer's tokenizer (:class:`~attnprof.singlecell.nicheformer.tokenizer.Tokenizer`) and model call."""

    name = "nicheformer"
    n_context = N_CONTEXT
    keeps_context_only = True  # a cell without vocabulary counts is profiled with its context tokens only

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.genes = tokenizer.vocab.token_names()
        self.special_ids = tokenizer.vocab.special_ids()
        self.context_length = tokenizer.context_length

    def settings(self) -> dict:
        return self.tokenizer.settings()  # as before the registry: profiles and checkpoints keep matching

    def present_ids(self, adata, layer=None, use_raw=False, gene_key=None) -> np.ndarray:
        """The reserved ids (context tokens, padding) and the ids of the data's genes that are in the vocabulary:
        a MERFISH panel holds a few hundred of the 20,310 genes, and sums over the rest would stay zero."""
        var = count_matrix(adata, layer, use_raw)[1]
        with warnings.catch_warnings():  # the tokenizer's own alignment says which genes it drops
            warnings.simplefilter("ignore")
            genes = align_genes(gene_names(var, gene_key), self.tokenizer.vocab).vocab_index
        return np.union1d(np.arange(GENE_OFFSET), GENE_OFFSET + np.asarray(genes, dtype=np.int64))

    def chunks(self, adata, *, rows, left_out=None, stream_rows=None, **reading):
        return iter_token_chunks(adata, self.tokenizer, rows=rows, **reading)

    def context_only(self, batch) -> int:
        """Counted cells of a batch that hold only their context tokens."""
        lengths = (batch.tokens != PAD).sum(1).numpy()
        return int(np.sum((lengths == N_CONTEXT) & (np.asarray(batch.codes) >= 0)))

    def left_out_message(self, n: int) -> str:
        return f"{n} cells have no counts in vocabulary genes and were profiled with only their {N_CONTEXT} context tokens"


def nicheformer_front(model, adata, vocab=None, means=None, *, layer=None, use_raw=False, gene_key=None,
                      **context) -> NicheformerFront:  # fmt: skip
    """The front end of a Nicheformer ``model`` (anything with ``n_tokens`` and ``context_length``) over
    ``adata``: its vocabulary (default: the data's genes), checked against the model, and its tokenizer
    (``means`` and the context options of :class:`~attnprof.singlecell.nicheformer.tokenizer.Tokenizer`)."""
    n_tokens, context_length = model_shape(model)
    if vocab is None:
        vocab = Vocabulary(gene_names(count_matrix(adata, layer, use_raw)[1], gene_key), source="the data's genes")
    vocab = as_vocabulary(vocab)
    if vocab.n_tokens != n_tokens:
        raise ValueError(
            f"the vocabulary ({vocab.source}) has {len(vocab)} genes, so the model would need "
            f"n_tokens={vocab.n_tokens}, but it has n_tokens={n_tokens} ({n_tokens - 30} genes): "
            f"pass the gene list the model was trained with"
        )
    return NicheformerFront(Tokenizer(vocab, means, context_length=context_length, **context))


def model_shape(model) -> tuple[int, int]:
    """(n_tokens, context_length) of a Nicheformer-like model, with a clear error for anything else."""
    try:
        return int(model.n_tokens), int(model.context_length)
    except AttributeError:
        raise TypeError(
            f"profile_anndata profiles Nicheformer-style models that take token ids and expose n_tokens and "
            f"context_length (attnprof.singlecell.Nicheformer); got {type(model).__name__}"
        ) from None
