"""Welch p-values, BH q-values and label-permutation p-values behave on planted and null data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import attnprof
from attnprof.tables import bh

from test_tables import FEATURE, PLANT_HEAD, VOCAB, cells, planted_model


def profile_with_permutations(model, x, tokens, padding, codes, n_perm, seed=0, batch=16):
    rng = np.random.default_rng(seed)
    null = [rng.permutation(codes) for _ in range(n_perm)]  # global permutations, streamed by batch
    genes = [f"g{i}" for i in range(VOCAB)]
    with attnprof.Profiler(model, groups=["a", "b"], genes=genes, window=6) as prof, torch.inference_mode():
        for s in range(0, len(codes), batch):
            part = slice(s, s + batch)
            prof.set_batch(groups=codes[part], tokens=tokens[part], null_groups=[n[part] for n in null])
            model(x[part], src_key_padding_mask=padding[part])
    return prof.profile


def test_planted_head_is_found_and_top_ranked():
    model = planted_model()
    x, tokens, padding = cells(n=20, seed=3)
    x_b = x.clone()
    x_b[:, 0, FEATURE] = 2.0
    codes = np.array([0] * 20 + [1] * 20)
    profile = profile_with_permutations(model, torch.cat([x, x_b]), torch.cat([tokens, tokens]),
                                        torch.cat([padding, padding]), codes, n_perm=19)  # fmt: skip
    cmp = profile.compare("b", "a", permutations=19)
    genes = cmp.heads.query("family == 'gene'")
    top = genes.sort_values("max_abs_diff", ascending=False).iloc[0]
    assert (top["layer"], top["head"], top["where"]) == (0, PLANT_HEAD, "g7")
    assert top["p_perm_max_abs_diff"] == pytest.approx(1 / 20)  # beats every permutation
    best = cmp.genes.iloc[0]  # the gene table comes most significant first
    assert (best["layer"], best["head"], best["gene"]) == (0, PLANT_HEAD, "g7") and best["q"] < 1e-3
    # against the permutation null: the planted head ranks first, far above its null band
    first = cmp.ranked_heads("gene").iloc[0]
    assert (first["layer"], first["head"]) == (0, PLANT_HEAD)
    assert first["p_perm_mean_abs_diff"] == cmp.heads["p_perm_mean_abs_diff"].min() == pytest.approx(1 / 20)
    band = first["mean_abs_diff_null_q95"] - first["mean_abs_diff_null_mean"]
    assert first["mean_abs_diff_excess"] > 3 * band > 0
    layer0 = cmp.layers.query("layer == 0 and family == 'gene'").iloc[0]
    assert layer0["mean_abs_diff"] > layer0["mean_abs_diff_null_q95"] and layer0["p_perm_mean_abs_diff"] == 1 / 20


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
    profile = profile_with_permutations(model, x, tokens, padding, codes, n_perm=19, batch=48)
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
    """A random encoder on cells whose labels are unrelated to them, with 39 label permutations."""
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(32, 8, 64, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False).eval()
    n, L = 120, 12
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, L, 32, generator=g)
    tokens = torch.randint(0, VOCAB, (n, L), generator=g)
    padding = torch.arange(L)[None, :] >= torch.randint(4, L + 1, (n, 1), generator=g)
    codes = np.random.default_rng(3).permutation(np.arange(n) % 2)
    return profile_with_permutations(model, x, tokens, padding, codes, n_perm=39, batch=60)


def test_shuffled_labels_stay_within_the_null_band(shuffled):
    """Labels and permutations are exchangeable: taking each labeling in turn as the observed one, every
    layer's mean |D| lies at or below its null 95th percentile (the other 39) about 95% of the time."""
    labelings = [shuffled.sums, *shuffled.null]
    above, excess = [], []
    for i, sums in enumerate(labelings):
        rotated = attnprof.Profile(sums, **shuffled._fields(), null=labelings[:i] + labelings[i + 1 :])
        layers = attnprof.compare(rotated, "a", "b").layers
        above += list(layers["mean_abs_diff"] > layers["mean_abs_diff_null_q95"])
        excess += list(layers["mean_abs_diff_excess"] / layers["mean_abs_diff_null_mean"])
    assert len(above) == 40 * 3 * 2  # labelings x layers x families
    assert 0.01 <= np.mean(above) <= 0.10, np.mean(above)
    assert abs(np.mean(excess)) < 0.02  # the excess over the null mean centres on zero


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


def test_permutations_need_null_labelings():
    model = planted_model()
    x, tokens, padding = cells(n=6)
    profile = profile_with_permutations(model, x, tokens, padding, np.array([0, 1] * 3), n_perm=2)
    with pytest.raises(ValueError, match="needs that many label permutations.*has 2"):
        profile.compare("a", "b", permutations=5)


def test_null_labelings_survive_save_load_and_merge(tmp_path):
    model = planted_model()
    x, tokens, padding = cells(n=6)
    profile = profile_with_permutations(model, x, tokens, padding, np.array([0, 1] * 3), n_perm=2)
    loaded = attnprof.Profile.load(profile.save(tmp_path / "p.npz"))
    assert len(loaded.null) == 2
    for mine, theirs in zip(profile.null, loaded.null):
        assert all(np.array_equal(mine[k], theirs[k]) for k in mine)
    merged = loaded + profile
    np.testing.assert_allclose(merged.null[1]["pos_sum"], 2 * profile.null[1]["pos_sum"])


def test_permutation_null_reads_differences_of_means_only(shuffled):
    """A permutation holds sums and counts, no sums of squares (they read as 0): its null statistics are
    the heads' mean and max |D| of its own labeling, whatever its squares hold, and nothing built on a
    variance (noise floor, Welch t) comes out of its zero squares as a silent 0."""
    cmp = shuffled.compare("a", "b")
    own = [shuffled.null_profile(i).compare("a", "b", permutations=0) for i in range(len(shuffled.null))]
    for table in ("heads", "layers"):
        for col in ("mean_abs_diff", "max_abs_diff"):
            null = np.stack([getattr(c, table)[col].to_numpy() for c in own])
            np.testing.assert_allclose(getattr(cmp, table)[f"{col}_null_mean"], null.mean(0), rtol=1e-12)
            np.testing.assert_allclose(getattr(cmp, table)[f"{col}_null_q95"], np.quantile(null, 0.95, 0), rtol=1e-12)
    for c in own:  # no squares: the variance is unknown, never 0
        assert c.heads["noise_floor"].isna().all() and c.heads["excess_over_noise"].isna().all()
        assert c.genes["t"].isna().all() and c.genes["p"].isna().all() and len(c.genes) > 0
        assert c.heads["mean_abs_diff"].gt(0).all()
    # the same permutations with made-up squares give the same null columns: squares are never read
    squared = [{k: np.full_like(v, 7.0) if k.endswith("_sq") else v for k, v in sums.items()} for sums in shuffled.null]
    other = attnprof.compare(attnprof.Profile(shuffled.sums, **shuffled._fields(), null=squared), "a", "b")
    null_cols = [c for c in cmp.heads if "_null_" in c or c.startswith("p_perm")]
    pd.testing.assert_frame_equal(other.heads[null_cols], cmp.heads[null_cols])
