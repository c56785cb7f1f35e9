"""Single-cell front end: AnnData in, Nicheformer model, tokenization, batching, one-call profiling.

>>> from attnprof.singlecell import load_nicheformer, profile_anndata
>>> model = load_nicheformer("nicheformer.ckpt")
>>> profile = profile_anndata(model, "hypothalamus.h5ad", groupby="sex",
...                           vocab="model.h5ad", means="merfish_mean_script.npy")
>>> profile.compare("female", "male").layers
"""

from .batches import Batch, CellSelection, make_batches, select_cells
from .family import FrontEnd
from .geneformer import geneformer_front_end, load_geneformer_model
from .nicheformer import Nicheformer, NicheformerConfig, load_nicheformer, save_checkpoint, small_nicheformer
from .registry import detect_family, load_front_end
from .run import profile_anndata, profile_batches, write_outputs
from .scgpt import ScGPT, load_scgpt, scgpt_front_end
from .tokenize import Tokenizer, align_genes, iter_token_chunks, tokenize_anndata
from .vocab import ASSAY, MODALITY, SPECIES, Vocabulary

__all__ = [
    "ASSAY",
    "MODALITY",
    "SPECIES",
    "Batch",
    "CellSelection",
    "FrontEnd",
    "Nicheformer",
    "NicheformerConfig",
    "ScGPT",
    "Tokenizer",
    "Vocabulary",
    "align_genes",
    "detect_family",
    "geneformer_front_end",
    "iter_token_chunks",
    "load_front_end",
    "load_geneformer_model",
    "load_nicheformer",
    "load_scgpt",
    "make_batches",
    "profile_anndata",
    "profile_batches",
    "save_checkpoint",
    "scgpt_front_end",
    "select_cells",
    "small_nicheformer",
    "tokenize_anndata",
    "write_outputs",
]
