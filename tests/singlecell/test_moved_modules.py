"""The family sub-packages: old module paths still import (with a DeprecationWarning naming the new one) and give
the same objects; the registry and the package import no model until one is asked for."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import attnprof.singlecell as singlecell

#: old module -> (new module, names the old one still gives)
MOVED = {
    "attnprof.singlecell.tokenize": ("attnprof.singlecell.nicheformer.tokenizer",
                                     ("Tokenizer", "iter_token_chunks", "tokenize_anndata", "TARGET_SUM")),
    "attnprof.singlecell.technologies": ("attnprof.singlecell.nicheformer.technologies",
                                         ("TechnologyMeans", "PUBLISHED_MEANS", "published_folder", "obs_context")),
    "attnprof.singlecell.argsort": ("attnprof.singlecell.nicheformer.argsort",
                                    ("numba_argsort", "argsort_segments", "compiled_available", "SMALL_QUICKSORT")),
    "attnprof.singlecell.counts": ("attnprof.singlecell.nicheformer.counts",
                                   ("inspect_counts", "log1p_tolerance", "read_rows", "expm1")),
    "attnprof.singlecell.nicheformer_front": ("attnprof.singlecell.nicheformer.front",
                                              ("NicheformerFront", "nicheformer_front", "model_shape")),
}  # fmt: skip


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_module_path_warns_and_still_works(old):
    new, names = MOVED[old]
    sys.modules.pop(old, None)  # a fresh import: the warning comes with the import
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        shim = importlib.import_module(old)
    module = importlib.import_module(new)
    for name in names:
        assert getattr(shim, name) is getattr(module, name)
    assert set(shim.__all__) >= set(names)


def test_the_old_tokenize_module_still_tokenizes():
    import numpy as np
    import scipy.sparse as sp

    sys.modules.pop("attnprof.singlecell.tokenize", None)
    with pytest.warns(DeprecationWarning):
        from attnprof.singlecell.tokenize import TokenChunk, Tokenizer, align_genes

    tokenizer = Tokenizer(["a", "b", "c"], context_length=8)
    with pytest.warns(UserWarning, match="not in the vocabulary"):
        alignment = align_genes(["c", "a", "x"], tokenizer.vocab)
    tokens, lengths = tokenizer.tokenize_rows(sp.csr_matrix(np.array([[5.0, 1.0, 2.0], [0.0, 0.0, 0.0]])), alignment)
    assert tokens.tolist() == [[6, 7, 4, 32, 30], [6, 7, 4, 1, 1]] and lengths.tolist() == [5, 3]
    assert TokenChunk.__module__ == "attnprof.singlecell.batches"


@pytest.mark.parametrize("name", ["load_means", "technology_means", "TOKENIZATIONS"])
def test_the_means_moved_out_of_vocab_warn_and_still_work(name):
    from attnprof.singlecell import vocab
    from attnprof.singlecell.nicheformer import technologies

    with pytest.warns(DeprecationWarning, match=f"vocab.{name} moved to attnprof.singlecell.nicheformer"):
        assert getattr(vocab, name) is getattr(technologies, name)
    with pytest.raises(AttributeError):
        vocab.no_such_name  # noqa: B018


def test_the_family_packages_keep_the_old_modules_names():
    from attnprof.singlecell import geneformer, nicheformer

    for name in ("Nicheformer", "NicheformerConfig", "load_nicheformer", "save_checkpoint", "small_nicheformer",
                 "TRAINING_HEADS", "HPARAM_NAMES", "ANCHOR"):  # fmt: skip
        assert hasattr(nicheformer, name), name
    for name in ("GeneformerTokenizer", "GeneformerFrontEnd", "geneformer_front_end", "load_geneformer_model",
                 "read_dictionary", "require_transformers", "TARGET_SUM", "SPECIAL", "INPUT_SIZE"):  # fmt: skip
        assert hasattr(geneformer, name), name


def test_the_package_exports_every_public_name():
    for name in singlecell.__all__:
        assert getattr(singlecell, name) is not None, name
    assert set(singlecell.__all__) <= set(dir(singlecell))
    with pytest.raises(AttributeError):
        singlecell.no_such_name  # noqa: B018


def test_the_registry_imports_no_model_family():
    """``import attnprof.singlecell.registry`` (the command line's parser does) loads none of the families."""
    code = ("import sys, attnprof.singlecell.registry as r; assert r.FAMILIES; "
            "loaded = [m for m in sys.modules if m.startswith(('attnprof.singlecell.nicheformer', "
            "'attnprof.singlecell.geneformer', 'attnprof.singlecell.scgpt', 'attnprof.singlecell.run'))]; "
            "assert not loaded, loaded")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
