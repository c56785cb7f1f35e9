"""The Geneformer front end: a loaded BERT model and the two dictionaries -> tokenizer, model inputs, gene names."""

from __future__ import annotations

import torch

from ..family import FrontEnd
from .checkpoint import read_dictionary
from .tokenizer import GeneformerTokenizer


class GeneformerFrontEnd(FrontEnd):
    """Geneformer through the ``hf`` adapter: ``model(input_ids, attention_mask)`` of a transformers BERT."""

    name = "geneformer"
    adapter = "hf"

    def __init__(self, tokenizer: GeneformerTokenizer, vocab_size: int):
        self.tokenizer = tokenizer
        self.pad_id = int(tokenizer.token_dict.get("<pad>", 0))
        self.n_context = 1 if tokenizer.special else 0  # <cls> leads; <eos> trails and is no context
        self.context_length = tokenizer.input_size
        top = max(tokenizer.token_dict.values())
        if top >= vocab_size:
            raise ValueError(
                f"the token dictionary has ids up to {top} but the model embeds {vocab_size} tokens: "
                f"pass the dictionary of this model's release (V1 and V2 dictionaries differ)"
            )
        names = [f"<unused {i}>" for i in range(vocab_size)]
        for gene, token in tokenizer.token_dict.items():
            names[token] = str(gene)
        self.genes = names
        self.special_ids = sorted(set(range(vocab_size)) - set(tokenizer.token_of.tolist()))

    def gene_ids(self, codes: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.packing.unpack(codes, self.pad_id)[0]

    def inputs(self, codes: torch.Tensor) -> dict:
        ids, _, padding = self.tokenizer.packing.unpack(codes, self.pad_id)
        return {"input_ids": ids, "attention_mask": (~padding).long()}

    def left_out_message(self, n: int) -> str:
        return (
            f"{n} cells have no counts in genes of the token dictionary (or n_counts 0) and were left out, "
            f"as Geneformer's tokenizer drops cells without dictionary genes"
        )


def geneformer_front_end(model, token_dictionary, gene_medians, *, input_size=None, counts_key="n_counts",
                         trust_checkpoint: bool = False):  # fmt: skip
    """The Geneformer front end for ``model`` from the two dictionary files (paths, read as plain data unless
    ``trust_checkpoint``, or dicts)."""
    def read(value, what):
        return value if isinstance(value, dict) else read_dictionary(value, what, trust_checkpoint)

    token_dict, medians = read(token_dictionary, "token dictionary"), read(gene_medians, "gene median dictionary")
    tokenizer = GeneformerTokenizer(token_dict, medians, input_size=input_size, counts_key=counts_key)
    positions = int(model.config.max_position_embeddings)
    if tokenizer.input_size > positions:
        raise ValueError(
            f"the tokenizer makes up to {tokenizer.input_size} tokens per cell but the model has {positions} "
            f"positions: pass the dictionary of this model's version, or a smaller input size (--max-length)"
        )
    return GeneformerFrontEnd(tokenizer, int(model.config.vocab_size))
