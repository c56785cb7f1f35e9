"""Difference tables: planted differences are found where they were planted; equal groups give zero."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import attnprof
from attnprof.tables import welch

D_MODEL, HEADS, HEAD_DIM, VOCAB = 16, 4, 4, 30
PLANT_HEAD, FEATURE, GENE = 2, 0, 7  # head 2 of layer 0 attends to feature 0, carried by gene 7


def planted_model():
    """Layer-0 head 2 scores keys by input feature 0; no other head of layer 0 can see it."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D_MODEL, HEADS, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    with torch.no_grad():
        attn = model.layers[0].self_attn
        w, b = attn.in_proj_weight, attn.in_proj_bias
        E = D_MODEL
        w[: 2 * E, FEATURE] = 0  # no query or key of any head reads the feature ...
        h = slice(PLANT_HEAD * HEAD_DIM, (PLANT_HEAD + 1) * HEAD_DIM)
        w[h][0].zero_()
        b[h] = 0
        b[PLANT_HEAD * HEAD_DIM] = 2.0  # ... except head 2: constant query ...
        w[E + PLANT_HEAD * HEAD_DIM, FEATURE] = 3.0  # ... times a key that carries the feature
    return model


def cells(n=12, L=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, L, D_MODEL, generator=g)
    x[:, :, FEATURE] = 0
    tokens = torch.stack([torch.randperm(VOCAB, generator=g)[:L] for _ in range(n)])
    padding = torch.zeros(n, L, dtype=torch.bool)
    padding[::3, L - 3 :] = True
    tokens[:, 0] = GENE  # every cell carries the gene, at position 0
    return x, tokens, padding


def profile_of(model, x, tokens, padding, labels):
    with attnprof.Profiler(model, groups=["a", "b"], genes=[f"g{i}" for i in range(VOCAB)], window=6,
                           panel=["g7", "g3"]) as prof, torch.inference_mode():  # fmt: skip
        prof.set_batch(groups=labels, tokens=tokens)
        model(x, src_key_padding_mask=padding)
    return prof.profile


@pytest.fixture(scope="module")
def planted():
    model = planted_model()
    x, tokens, padding = cells()
    x_b = x.clone()
    x_b[:, 0, FEATURE] = 2.0  # group b: the same cells, with gene 7 carrying the feature
    profile = profile_of(model, torch.cat([x, x_b]), torch.cat([tokens, tokens]), torch.cat([padding, padding]),
                         ["a"] * 12 + ["b"] * 12)  # fmt: skip
    return profile.compare("b", "a")


def test_planted_difference_is_in_the_right_layer_head_and_gene(planted):
    heads = planted.heads.query("layer == 0 and family == 'gene'").set_index("head")
    assert heads["max_abs_diff"].idxmax() == PLANT_HEAD
    others = heads.drop(index=PLANT_HEAD)
    assert others["max_abs_diff"].max() < 1e-6 < heads.at[PLANT_HEAD, "max_abs_diff"]
    assert heads.at[PLANT_HEAD, "where"] == "g7"
    genes = planted.genes.query("layer == 0 and head == @PLANT_HEAD")
    top = genes.loc[genes["diff"].abs().idxmax()]
    assert top["gene"] == "g7" and top["diff"] > 0.1  # b's cells attend more to the gene
    layer0 = planted.layers.query("layer == 0").set_index("family")
    assert layer0.at["gene", "max_head"] == PLANT_HEAD
    assert layer0.at["gene", "mean_abs_diff"] == pytest.approx(heads["mean_abs_diff"].mean())
    positions = planted.heads.query("layer == 0 and family == 'position'").set_index("head")
    assert positions.at[PLANT_HEAD, "where"].endswith(",0")  # the key at position 0
    self_pairs = planted.pairs.query("layer == 0 and gene_a == 'g7' and gene_b == 'g7'").set_index("head")
    assert self_pairs["diff"].abs().idxmax() == PLANT_HEAD and self_pairs.at[PLANT_HEAD, "diff"] > 0.1
    assert planted.summaries.query("layer == 0 and head != @PLANT_HEAD")["diff"].abs().max() < 1e-6


def test_same_cells_in_both_groups_give_zero_difference():
    model = planted_model()
    x, tokens, padding = cells()
    profile = profile_of(model, torch.cat([x, x]), torch.cat([tokens, tokens]), torch.cat([padding, padding]),
                         ["a"] * 12 + ["b"] * 12)  # fmt: skip
    cmp = profile.compare("a", "b")
    assert cmp.heads["max_abs_diff"].max() < 1e-6
    assert cmp.genes["diff"].abs().max() < 1e-6
    assert cmp.summaries["diff"].abs().max() < 1e-6
    assert len(cmp.heads) == 2 * HEADS * 3  # layers x heads x families


def test_welch_matches_scipy():
    from scipy import stats

    rng = np.random.default_rng(0)
    a, b = rng.normal(0.2, 1, 9), rng.normal(0.0, 2, 14)
    c = welch(a.sum(), (a**2).sum(), a.size, b.sum(), (b**2).sum(), b.size, min_cells=2)
    expected = stats.ttest_ind(a, b, equal_var=False)
    assert c.t == pytest.approx(expected.statistic)
    assert c.diff == pytest.approx(a.mean() - b.mean())


def test_min_cells_excludes_rare_elements(planted):
    strict = planted.profile.compare("b", "a", min_cells=13)  # more than any group has
    assert strict.genes.empty
    assert strict.heads.query("family == 'gene'")["n_elements"].eq(0).all()
    assert strict.heads.query("family == 'gene'")["mean_abs_diff"].isna().all()


def test_anndata_export_and_save(planted, tmp_path):
    adata = planted.to_anndata()
    assert adata.shape == (2 * HEADS, planted.genes["gene"].nunique())
    row = adata.obs_names.get_loc(f"L0H{PLANT_HEAD}")
    genes = planted.genes.query("layer == 0 and head == @PLANT_HEAD").set_index("gene")
    np.testing.assert_allclose(adata[row, genes.index].X.ravel(), genes["diff"].to_numpy())
    planted.save(tmp_path)
    for name in ("heads", "layers", "genes", "pairs", "summaries"):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / f"{name}.csv"), planted.tables()[name],
                                      check_dtype=False, check_like=True)  # fmt: skip
        assert (tmp_path / f"{name}.parquet").exists()
    assert (tmp_path / "genes.h5ad").exists()


@pytest.mark.parametrize("a, b, message", [("a", "a", "two different"), ("a", "zz", "unknown group"), (0, 5, "out of range")])
def test_bad_contrasts(planted, a, b, message):
    with pytest.raises(ValueError, match=message):
        planted.profile.compare(a, b)


def test_comparing_a_group_with_zero_cells():
    model = planted_model()
    x, tokens, padding = cells(n=3)
    with attnprof.Profiler(model, groups=["a", "b", "c"], genes=VOCAB) as prof, torch.inference_mode():
        prof.set_batch(groups=[0, 1, 1], tokens=tokens)
        model(x, src_key_padding_mask=padding)
    with pytest.raises(ValueError, match=r"\['c'\] have zero cells"):
        prof.profile.compare("a", "c")
