"""Geneformer: its rank-value tokenizer and its BERT model from the files users have.

Modules: ``tokenizer`` (cells -> input ids, as Geneformer's ``TranscriptomeTokenizer`` makes them),
``checkpoint`` (the model folder, loaded as a transformers ``BertModel``, and the token and gene median
dictionaries), ``front`` (the front end for ``profile_anndata``). The model is transformers' own: there is
no model code here.
"""

from .checkpoint import load_geneformer_model, read_dictionary, require_transformers
from .front import GeneformerFrontEnd, geneformer_front_end
from .tokenizer import INPUT_SIZE, SPECIAL, TARGET_SUM, GeneformerTokenizer

__all__ = [
    "INPUT_SIZE", "SPECIAL", "TARGET_SUM", "GeneformerFrontEnd", "GeneformerTokenizer", "geneformer_front_end",
    "load_geneformer_model", "read_dictionary", "require_transformers",
]  # fmt: skip
