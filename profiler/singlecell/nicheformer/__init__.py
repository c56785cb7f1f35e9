"""Nicheformer: its encoder in plain PyTorch with the public checkpoints' names, and its tokenization.

Modules: ``model`` (the encoder), ``checkpoint`` (Lightning checkpoints, read and written), ``tokenizer``
(cells -> tokens equal to Nicheformer's own), with what only it uses: ``technologies`` (each cell's context
tokens and its technology's means), ``argsort`` (numba's quicksort order of ties), ``counts`` (the one pass
that checks the counts); ``front`` (the front end for ``profile_anndata``).
The gene vocabulary and its token layout (``attnprof.singlecell.vocab``) are shared by every family.
"""

from .checkpoint import ANCHOR, TRAINING_HEADS, load_nicheformer, save_checkpoint
from .front import NicheformerFront, model_shape, nicheformer_front
from .model import HPARAM_NAMES, Nicheformer, NicheformerConfig, small_nicheformer
from .tokenizer import Tokenizer, iter_token_chunks, tokenize_anndata

__all__ = [
    "ANCHOR", "HPARAM_NAMES", "TRAINING_HEADS", "Nicheformer", "NicheformerConfig", "NicheformerFront", "Tokenizer",
    "iter_token_chunks", "load_nicheformer", "model_shape", "nicheformer_front", "save_checkpoint",
    "small_nicheformer", "tokenize_anndata",
]  # fmt: skip
