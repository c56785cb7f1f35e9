"""Cell selection, batching and profile_anndata: trimming changes nothing, bad input fails clearly."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from attnprof.singlecell import (
    make_batches,
    profile_anndata,
    select_cells,
    tokenize_anndata,
)
from attnprof.singlecell.nicheformer.tokenizer import Tokenizer, iter_token_chunks
from helpers import demo_fixtures

# context 48 < the longest cells: truncation happens, and the window (32) is shorter than most cells
adata, vocab, means, model = demo_fixtures(n_cells=80, n_genes=60, seed=1, context_length=48)


def run(model, data, vocab, means, **kw):
    options = dict(vocab=vocab, means=means, window=32, batch_size=8, chunk_size=16, bucket_size=32, progress=False)
    return profile_anndata(model, data, "sex", **{**options, **kw})


# ------------------------------------------------------------ cell selection
def obs_frame():
    return pd.DataFrame(
        {
            "sex": pd.Categorical(["male", "female", None, "female", "male", None], categories=["male", "female", "x"]),
            "cell_type": ["neuron", "glia", "neuron", "neuron", "glia", "glia"],
            "batch": [2, 1, 1, 2, 2, 1],
        }
    )


def test_groups_follow_category_order_and_drop_nan_with_a_count():
    with pytest.warns(UserWarning, match=r"2 of 6 cells have no 'sex' label \(NaN\) and are left out"):
        sel = select_cells(obs_frame(), "sex")
    assert sel.groups == ["male", "female"]  # category order; the empty category "x" is dropped
    assert sel.rows.tolist() == [0, 1, 3, 4]
    assert sel.codes.tolist() == [0, 1, 1, 0]
    assert sel.counts() == {"male": 2, "female": 2}


def test_groups_can_be_restricted_and_reordered():
    sel = select_cells(obs_frame(), "batch", groups=["2", "1"])
    assert sel.groups == ["2", "1"] and sel.codes_for(np.array([1, 3])).tolist() == [1, 0]


def test_subset_by_an_obs_query():
    with pytest.warns(UserWarning, match="1 of 3 cells"):
        sel = select_cells(obs_frame(), "sex", subset="cell_type == 'neuron'", min_groups=1)
    assert sel.rows.tolist() == [0, 3]


@pytest.mark.filterwarnings("ignore:.*label \\(NaN\\)")
def test_selection_errors_name_the_problem():
    obs = obs_frame()
    with pytest.raises(ValueError, match="no column 'sexx'.*did you mean 'sex'"):
        select_cells(obs, "sexx")
    with pytest.raises(ValueError, match="1 group with cells.*a contrast needs two"):
        select_cells(obs, "cell_type", subset="batch == 1 and cell_type == 'glia'")
    with pytest.raises(ValueError, match=r"group\(s\) \['x'\] have no cells.*with cells: 2 groups \(male, female\)"):
        select_cells(obs, "sex", groups=["male", "x"])
    with pytest.raises(ValueError, match="selects no cells \\(of 6\\)"):
        select_cells(obs, "sex", subset="cell_type == 'astrocyte'")
    with pytest.raises(ValueError, match="cannot evaluate the subset.*tissue"):
        select_cells(obs, "sex", subset="tissue == 'brain'")


# ----------------------------------------------------------------- batching
def test_batches_are_bucketed_trimmed_and_cover_every_cell(adata, vocab, means):
    sel = select_cells(adata.obs, "sex")
    chunks = iter_token_chunks(adata, Tokenizer(vocab, means, context_length=48), rows=sel.rows, chunk_size=16)
    batches = list(make_batches(chunks, sel.codes_for, batch_size=8, bucket_size=32))
    assert sorted(np.concatenate([b.rows for b in batches]).tolist()) == sel.rows.tolist()
    full = tokenize_anndata(adata, vocab, means, context_length=48)
    for b in batches:
        lengths = (b.tokens != 1).sum(1)
        assert b.tokens.shape[1] == lengths.max()  # trimmed to the longest real cell
        np.testing.assert_array_equal(b.tokens.numpy(), full[b.rows, : b.tokens.shape[1]])
        np.testing.assert_array_equal(b.codes, sel.codes_for(b.rows))
    widths = [b.tokens.shape[1] for b in batches]
    assert widths[:4] == sorted(widths[:4], reverse=True)  # longest first within the first bucket
    assert min(widths) < 48  # the point of trimming


# ------------------------------------------------------------ profile_anndata
def test_trimming_changes_no_statistic(model, adata, vocab, means):
    panel = ["Esr1", "Ar", "Pgr", "Gal"]
    trimmed = run(model, adata, vocab, means, panel=panel, backend="torch")
    padded = run(model, adata, vocab, means, panel=panel, backend="torch", trim_padding=False)
    assert trimmed.sums.keys() == padded.sums.keys()
    for name in trimmed.sums:
        np.testing.assert_allclose(trimmed.sums[name], padded.sums[name], rtol=1e-5, atol=1e-8, err_msg=name)


def test_profile_names_tokens_and_counts_genes_per_group(model, adata, vocab, means):
    profile = run(model, adata, vocab, means, backend="reference")
    assert profile.groups == ["female", "male"]
    assert profile.cells == adata.obs["sex"].value_counts().to_dict()
    assert profile.layers == ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"]
    assert profile.n_context == 3 and profile.window == 32
    ids = profile.meta["token_ids"]  # the genes are the token ids the data can hold, by their names
    assert profile.genes == [vocab.token_names()[i] for i in ids] and len(ids) < model.n_tokens + 5
    # a gene's cell count per group is the number of that group's cells whose tokens hold it
    tokens = tokenize_anndata(adata, vocab, means, context_length=48)
    female = (adata.obs["sex"] == "female").to_numpy()
    for gene in ("Esr1", "Ar", "Gad1"):
        t = profile.genes.index(gene)
        held = (tokens == ids[t]).any(1)
        assert profile.group_sums()["recv_count"][0, :, t].tolist() == [held[female].sum(), held[~female].sum()]
    mouse = profile.genes.index("<species:mouse>")
    assert profile.group_sums()["recv_count"][0, :, mouse].tolist() == [female.sum(), (~female).sum()]
    assert profile.meta["options"]["tokenizer"]["context"] == [6, 7, 4]


def test_fast_backend_matches_reference(model, adata, vocab, means):
    fast = run(model, adata, vocab, means, backend="torch")
    ref = run(model, adata, vocab, means, backend="reference")
    for name in ref.sums:
        np.testing.assert_allclose(fast.sums[name], ref.sums[name], rtol=1e-4, atol=1e-7, err_msg=name)


def test_backed_file_gives_the_same_profile(model, adata, vocab, means, tmp_path):
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    from_file = run(model, path, vocab, means, backend="torch")
    in_memory = run(model, adata, vocab, means, backend="torch")
    for name in in_memory.sums:
        np.testing.assert_array_equal(from_file.sums[name], in_memory.sums[name], err_msg=name)
    assert from_file.meta["data"]["source"] == str(path)
    assert from_file.meta["options"] == in_memory.meta["options"]  # shards of one dataset merge
    assert from_file.meta["model"] == in_memory.meta["model"]


def test_nan_labels_and_subset(model, adata, vocab, means):
    data = adata.copy()
    data.obs["sex"] = data.obs["sex"].astype(object)
    data.obs.iloc[:5, data.obs.columns.get_loc("sex")] = np.nan
    with pytest.warns(UserWarning, match="5 of 80 cells have no 'sex' label"):
        profile = run(model, data, vocab, means)
    assert sum(profile.cells.values()) == 75
    neurons = run(model, adata, vocab, means, subset="cell_type == 'astrocyte'")
    assert sum(neurons.cells.values()) == int((adata.obs["cell_type"] == "astrocyte").sum())
    assert neurons.meta["data"]["subset"] == "cell_type == 'astrocyte'"


def test_cells_without_vocabulary_genes_are_profiled_with_a_warning(model, adata, vocab, means):
    data = adata[:12].copy()
    data.X = data.X.toarray()
    data.X[:3] = 0
    with pytest.warns(UserWarning, match="3 cells have no counts in vocabulary genes"):
        profile = run(model, data, vocab, means)
    assert sum(profile.cells.values()) == 12


def test_vocabulary_must_fit_the_model(model, adata):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="60 genes, so the model would need n_tokens=90.*has n_tokens=110"):
            run(model, adata, None, None)  # the data's own 60 genes; the model knows 80
    with pytest.raises(TypeError, match="Nicheformer-style models"):
        profile_anndata(torch.nn.Linear(2, 2), adata, "sex")


def test_unknown_panel_gene_fails(model, adata, vocab, means):
    with pytest.raises(ValueError, match=r"panel genes \['Foo'\] are not in the vocabulary"):
        run(model, adata, vocab, means, panel=["Esr1", "Foo"])
