"""Single-cell front end: AnnData in, a model family's tokenizer and model, batching, one-call profiling.

Each model family is a sub-package (``nicheformer``, ``geneformer``, ``scgpt``: model, checkpoint loading,
tokenizer, front end) behind one registry (``registry``); the names below are imported on first use, so
``import attnprof.singlecell.registry`` loads no model.

>>> from attnprof.singlecell import load_nicheformer, profile_anndata
>>> model = load_nicheformer("nicheformer.ckpt")
>>> profile = profile_anndata(model, "hypothalamus.h5ad", groupby="sex",
...                           vocab="model.h5ad", means="merfish_mean_script.npy")
>>> profile.compare("female", "male").layers
"""

import importlib

#: Public name -> the module (relative to this package) that defines it.
_NAMES = {
    "ASSAY": ".vocab",
    "MODALITY": ".vocab",
    "SPECIES": ".vocab",
    "Batch": ".batches",
    "CellSelection": ".batches",
    "FrontEnd": ".family",
    "Nicheformer": ".nicheformer",
    "NicheformerConfig": ".nicheformer",
    "ScGPT": ".scgpt",
    "Tokenizer": ".nicheformer",
    "Vocabulary": ".vocab",
    "align_genes": ".alignment",
    "detect_family": ".registry",
    "geneformer_front_end": ".geneformer",
    "iter_token_chunks": ".nicheformer",
    "load_front_end": ".registry",
    "load_geneformer_model": ".geneformer",
    "load_nicheformer": ".nicheformer",
    "load_scgpt": ".scgpt",
    "make_batches": ".batches",
    "profile_anndata": ".run",
    "profile_batches": ".run",
    "save_checkpoint": ".nicheformer",
    "scgpt_front_end": ".scgpt",
    "select_cells": ".batches",
    "small_nicheformer": ".nicheformer",
    "tokenize_anndata": ".nicheformer",
    "write_outputs": ".write",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name], __name__), name)
        globals()[name] = value  # once: later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_NAMES))
