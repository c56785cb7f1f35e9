"""Welch p-values, BH q-values and permutation p-values (relabeled blocks, at compare time) behave on
planted and null data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import attnprof
from attnprof.blocks import Blocks
from attnprof.statistics import relabelings
from attnprof.tables import bh

from test_tables import FEATURE, PLANT_HEAD, VOCAB, cells, planted_model


def profile_cells(model, x, tokens, padding, codes, batch=16, **options):
    """Profile cells in batches; the profiler deals each group's cells into pseudo-replicate blocks."""
    genes = [f"g{i}" for i in range(VOCAB)]
    with attnprof.Profiler(model, groups=["a", "b"], genes=genes, window=6, **options) as prof, \
            torch.inference_mode():  # fmt: skip
        for s in range(0, len(codes), batch):
            part = slice(s, s + batch)
            prof.set_batch(groups=codes[part], tokens=tokens[part])
            model(x[part], src_key_padding_mask=padding[part])
    return prof.profile


def test_planted_head_is_found_and_top_ranked():
    model = planted_model()
    x, tokens, padding = cells(n=20, seed=3)
    x_b = x.clone()
    x_b[:, 0, FEATURE] = 2.0
    codes = np.array([0] * 20 + [1] * 20)
    # one cell per pseudo-replicate block: relabeling the blocks is shuffling the cells' labels
    profile = profile_cells(model, torch.cat([x, x_b]), torch.cat([tokens, tokens]), torch.cat([padding, padding]),
                            codes, pseudo_replicates=20)  # fmt: skip
    cmp = profile.compare("b", "a", permutations=199)
    genes = cmp.heads.query("family == 'gene'")
    top = genes.sort_values("max_abs_diff", ascending=False).iloc[0]
    assert (top["layer"], top["head"], top["where"]) == (0, PLANT_HEAD, "g7")
    assert top["p_perm_max_abs_diff"] == pytest.approx(1 / 200)  # beats every permutation
    best = cmp.genes.iloc[0]  # the gene table comes most significant first
    assert (best["layer"], best["head"], best["gene"]) == (0, PLANT_HEAD, "g7") and best["q"] < 1e-3
    # against the permutation null: the planted head ranks first, far above its null band
    first = cmp.ranked_heads("gene").iloc[0]
    assert (first["layer"], first["head"]) == (0, PLANT_HEAD)
    assert first["p_perm_mean_abs_diff"] == cmp.heads["p_perm_mean_abs_diff"].min() == pytest.approx(1 / 200)
    # family-wise over all heads: min-P counts the relabelings in which any head reaches its own smallest p
    assert first["p_fwer_mean_abs_diff"] == cmp.heads["p_fwer_mean_abs_diff"].min() <= 0.05
    # far above its null band: the excess is over twice the band's width (q95 - mean of 199 relabelings; the
    # same data with attnprof's earlier cell shuffles in the forward pass gave 2.2-2.6x over three seeds)
    band = first["mean_abs_diff_null_q95"] - first["mean_abs_diff_null_mean"]
    assert first["mean_abs_diff_excess"] > 2 * band > 0
    layer0 = cmp.layers.query("layer == 0 and family == 'gene'").iloc[0]
    assert layer0["mean_abs_diff"] > layer0["mean_abs_diff_null_q95"] and layer0["p_perm_mean_abs_diff"] == 1 / 200


def test_null_labels_give_about_alpha_false_positives():
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(32, 8, 64, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False).eval()
    n, L = 240, 12
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, L, 32, generator=g)
    tokens = torch.randint(0, VOCAB, (n, L), generator=g)
    padding = torch.arange(L)[None, :] >= torch.randint(4, L + 1, (n, 1), generator=g)
    codes = np.random.default_rng(3).permutation(np.arange(n) % 2)  # labels unrelated to the cells
    profile = profile_cells(model, x, tokens, padding, codes, batch=48)
    cmp = profile.compare("a", "b", permutations=19)
    welch_fp = (cmp.summaries["p"] < 0.05).mean()  # 3 layers x 8 heads x 4 summaries
    assert welch_fp <= 0.10, welch_fp
    perm_fp = (cmp.heads["p_perm_mean_abs_diff"] <= 0.05).mean()  # 3 x 8 heads x 2 families
    assert perm_fp <= 0.10, perm_fp
    assert (cmp.summaries["q"] < 0.05).sum() == 0  # BH keeps the null quiet
    p = cmp.genes["p"].dropna()
    assert 0.02 <= (p < 0.05).mean() <= 0.08  # thousands of gene tests: close to alpha


@pytest.fixture(scope="module")
def shuffled():
    """A random encoder on cells whose labels are unrelated to them (pseudo-replicate blocks)."""
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(32, 8, 64, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False).eval()
    n, L = 120, 12
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, L, 32, generator=g)
    tokens = torch.randint(0, VOCAB, (n, L), generator=g)
    padding = torch.arange(L)[None, :] >= torch.randint(4, L + 1, (n, 1), generator=g)
    codes = np.random.default_rng(3).permutation(np.arange(n) % 2)
    return profile_cells(model, x, tokens, padding, codes, batch=60)


def test_shuffled_labels_stay_within_the_null_band(shuffled):
    """Labelings of whole blocks are exchangeable: taking each of 40 relabelings in turn as the observed one,
    every layer's mean |D| lies above its null 95th percentile (39 others) about 5% of the time."""
    blocks = shuffled.blocks
    draws = relabelings(np.asarray(blocks.group) == 0, n=39, seed=5)
    above, excess = [], []
    for i, row in enumerate(draws.in_a):
        relabeled = Blocks(tuple(0 if a else 1 for a in row), blocks.names, None, True)
        rotated = attnprof.Profile(shuffled.sums, **{**shuffled._fields(), "blocks": relabeled})
        layers = attnprof.compare(rotated, "a", "b", permutations=39, seed=i).layers
        above += list(layers["mean_abs_diff"] > layers["mean_abs_diff_null_q95"])
        excess += list(layers["mean_abs_diff_excess"] / layers["mean_abs_diff_null_mean"])
    assert len(above) == 40 * 3 * 2  # labelings x layers x families
    assert 0.01 <= np.mean(above) <= 0.10, np.mean(above)
    assert abs(np.mean(excess)) < 0.03  # the excess over the null mean centres on zero


def test_noise_floor_predicts_the_null_mean(shuffled):
    """Without permutations the noise floor, sqrt(2/pi)·SE averaged like mean |D|, is the chance level."""
    cmp = shuffled.compare("a", "b")
    for table in (cmp.heads, cmp.layers):
        np.testing.assert_allclose(table["noise_floor"], table["mean_abs_diff_null_mean"], rtol=0.15)
        np.testing.assert_allclose(table["excess_over_noise"], table["mean_abs_diff"] - table["noise_floor"])


def test_bh_matches_the_definition():
    p = np.array([0.01, 0.04, np.nan, 0.03, 0.5])
    q = bh(p)
    ranked = np.array([0.01, 0.03, 0.04, 0.5])
    expected = np.minimum.accumulate((ranked * 4 / np.arange(1, 5))[::-1])[::-1]
    np.testing.assert_allclose(q[[0, 3, 1, 4]], expected)
    assert np.isnan(q[2])


def test_permutations_leave_the_forward_pass():
    model = planted_model()
    x, tokens, padding = cells(n=6)
    with attnprof.Profiler(model, groups=["a", "b"], window=6) as prof:
        with pytest.raises(TypeError, match="permutations no longer run in the forward pass"):
            prof.set_batch(groups=[0, 1] * 3, null_groups=[[1, 0] * 3])
    profile = profile_cells(model, x, tokens, padding, np.array([0, 1] * 3))
    with pytest.raises(ValueError, match="permutations must be >= 0"):
        profile.compare("a", "b", permutations=-1)
    # 3 cells per group in 8 pseudo-replicate blocks each: 3 vs 3 non-empty blocks, 20 relabelings in all
    cmp = profile.compare("a", "b", min_cells=1, permutations=1000)
    assert cmp.exact and cmp.permutations == 19 and cmp.min_p == pytest.approx(2 / 20)
    assert "all 20 distinct relabelings (exact): smallest possible p = 0.1 (its mirror image" in cmp.design()
    # the statistic of the mirror image ties the observed one: no head's p falls below 2/20
    assert (cmp.heads["p_perm_mean_abs_diff"].dropna() >= 0.1 - 1e-12).all()


def test_block_sums_survive_save_load_and_merge(tmp_path):
    model = planted_model()
    x, tokens, padding = cells(n=6)
    profile = profile_cells(model, x, tokens, padding, np.array([0, 1] * 3))
    loaded = attnprof.Profile.load(profile.save(tmp_path / "p.npz"))
    assert loaded.blocks == profile.blocks and loaded.layout() == profile.layout()
    assert all(np.array_equal(loaded.sums[k], v) for k, v in profile.sums.items())
    merged = loaded.accumulate(profile)
    np.testing.assert_allclose(merged.sums["pos_sum"], 2 * profile.sums["pos_sum"])
    for a, b in [(profile, loaded)]:
        pd.testing.assert_frame_equal(a.compare("a", "b", min_cells=1).heads, b.compare("a", "b", min_cells=1).heads)
