"""Single-cell front end: AnnData in, Nicheformer model, tokenization, batching, one-call profiling.

>>> from attnprof.singlecell import load_nicheformer, profile_anndata
>>> model = load_nicheformer("nicheformer.ckpt")
>>> profile = profile_anndata(model, "hypothalamus.h5ad", groupby="sex",
...                           vocab="model.h5ad", means="merfish_mean_script.npy")
>>> profile.compare("female", "male").layers
"""

from .batches import Batch, CellSelection, make_batches, select_cells
from .nicheformer import Nicheformer, NicheformerConfig, load_nicheformer, save_checkpoint, small_nicheformer
from .run import profile_anndata, profile_batches, write_outputs
from .tokenize import Tokenizer, align_genes, iter_token_chunks, tokenize_anndata
from .vocab import ASSAY, MODALITY, SPECIES, Vocabulary

__all__ = [
    "ASSAY",
    "MODALITY",
    "SPECIES",
    "Batch",
    "CellSelection",
    "Nicheformer",
    "NicheformerConfig",
    "Tokenizer",
    "Vocabulary",
    "align_genes",
    "iter_token_chunks",
    "load_nicheformer",
    "make_batches",
    "profile_anndata",
    "profile_batches",
    "save_checkpoint",
    "select_cells",
    "small_nicheformer",
    "tokenize_anndata",
    "write_outputs",
]
