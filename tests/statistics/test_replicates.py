"""Replicate-aware statistics: each new statistic against an independent computation from per-cell
values (scipy, statsmodels, brute-force loops), and the permutation null's error rates on simulated
experiments with animal effects (tiny models, many datasets)."""

from __future__ import annotations

import itertools
import math
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy import stats

import attnprof
from attnprof.blocks import Blocks, design_blocks
from attnprof.statistics import (
    bh, cell_contrast, head_null, mean_square_diff, permutation_p, relabelings, replicate_contrast, westfall_young,
)  # fmt: skip
from attnprof.statistics import null as null_module
from attnprof.statistics.welch import replicate_means


# ------------------------------------------------------------------ per-cell data
def cells_to_blocks(values, present, block, n_blocks):
    """Per-cell values [cells, H, E] (present [cells, E]) -> block sums, squares [B, H, E] and counts [B, 1, E]."""
    v = np.where(present[:, None, :], values, 0.0)
    onehot = np.eye(n_blocks)[block]  # [cells, B]
    sums = np.einsum("cb,che->bhe", onehot, v)
    sq = np.einsum("cb,che->bhe", onehot, v * v)
    counts = np.einsum("cb,ce->be", onehot, present.astype(float))[:, None, :]
    return sums, sq, counts


@st.composite
def experiments(draw):
    n_rep = draw(st.integers(2, 5)), draw(st.integers(2, 5))
    H, E = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    B = sum(n_rep)
    per = rng.integers(1, 9, size=B)
    block = np.repeat(np.arange(B), per)
    values = rng.normal(size=(len(block), H, E)) + rng.normal(size=(B, H, E))[block]
    present = rng.random((len(block), E)) < draw(st.sampled_from([0.6, 0.9, 1.0]))
    in_a = np.arange(B) < n_rep[0]
    min_cells = draw(st.integers(1, 3))
    return values, present, block, in_a, min_cells


@settings(max_examples=60, deadline=None)
@given(experiments())
def test_replicate_welch_matches_scipy_on_replicate_means(exp):
    values, present, block, in_a, min_cells = exp
    B = len(in_a)
    sums, sq, counts = cells_to_blocks(values, present, block, B)
    c = replicate_contrast(sums, counts, in_a, ~in_a, min_cells, min_replicates=2)
    _, H, E = values.shape
    for h, e in itertools.product(range(H), range(E)):
        means = {True: [], False: []}
        for b in range(B):  # each replicate's mean over its cells that hold the element
            held = (block == b) & present[:, e]
            if held.sum() >= min_cells:
                means[bool(in_a[b])].append(values[held, h, e].mean())
        a, b_ = np.array(means[True]), np.array(means[False])
        assert c.n_a[0, e] == len(a) and c.n_b[0, e] == len(b_)
        if len(a) < 2 or len(b_) < 2:
            assert np.isnan(c.diff[h, e])
            continue
        np.testing.assert_allclose(c.diff[h, e], a.mean() - b_.mean(), rtol=1e-10, atol=1e-12)
        ref = stats.ttest_ind(a, b_, equal_var=False)
        if np.isfinite(ref.statistic):
            np.testing.assert_allclose(c.t[h, e], ref.statistic, rtol=1e-7)
            np.testing.assert_allclose(c.p[h, e], ref.pvalue, rtol=1e-6, atol=1e-12)
        se = np.sqrt(a.var(ddof=1) / len(a) + b_.var(ddof=1) / len(b_))
        np.testing.assert_allclose(c.se[h, e], se, rtol=1e-7, atol=1e-15)


@settings(max_examples=40, deadline=None)
@given(experiments())
def test_cell_welch_matches_scipy_on_cells(exp):
    values, present, block, in_a, min_cells = exp
    sums, sq, counts = cells_to_blocks(values, present, block, len(in_a))
    c = cell_contrast(sums, sq, counts, in_a, ~in_a, min_cells)
    cell_a = in_a[block]
    _, H, E = values.shape
    for h, e in itertools.product(range(H), range(E)):
        a = values[cell_a & present[:, e], h, e]
        b = values[~cell_a & present[:, e], h, e]
        if min(len(a), len(b)) < max(min_cells, 1):
            assert np.isnan(c.diff[h, e])
            continue
        np.testing.assert_allclose(c.diff[h, e], a.mean() - b.mean(), rtol=1e-9, atol=1e-12)
        if min(len(a), len(b)) >= 2 and a.var() > 0 and b.var() > 0:
            np.testing.assert_allclose(c.t[h, e], stats.ttest_ind(a, b, equal_var=False).statistic, rtol=1e-6)


def test_bh_matches_statsmodels():
    from statsmodels.stats.multitest import multipletests

    p = np.random.default_rng(0).random(200) ** 3
    p[[3, 50]] = np.nan
    ok = ~np.isnan(p)
    np.testing.assert_allclose(bh(p)[ok], multipletests(p[ok], method="fdr_bh")[1], rtol=1e-12)
    assert np.isnan(bh(p)[~ok]).all()


# ------------------------------------------------------------------ the null
def brute_null(X, V, in_a, threshold, keep):
    """Each labeling's mean |D| and max |D| per head, one labeling and one element at a time."""
    N, (U, H, E) = len(in_a), X.shape
    mean, top = np.full((N, H), np.nan), np.full((N, H), np.nan)
    for k, row in enumerate(in_a):
        for h in range(H):
            d = []
            for e in range(E):
                ca, cb = V[row, e].sum(), V[~row, e].sum()
                if keep[e] and ca >= threshold and cb >= threshold:
                    d.append(abs(X[row, h, e].sum() / ca - X[~row, h, e].sum() / cb))
            if d:
                mean[k, h], top[k, h] = np.mean(d), np.max(d)
    return mean, top


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from(["replicate", "cell"]), st.integers(3, 7), st.sampled_from([1, 16]))
def test_head_null_equals_a_loop_over_labelings(seed, level, U, min_pattern):
    rng = np.random.default_rng(seed)
    H, E = 2, int(rng.integers(1, 40))
    if level == "replicate":
        V = (rng.random((U, E)) < rng.choice([0.7, 1.0])).astype(float)
        X = rng.random((U, H, E)) * V[:, None]
        threshold = 2
    else:
        V = rng.integers(0, 6, size=(U, E)).astype(float)
        X = rng.random((U, H, E)) * V[:, None]
        threshold = 3
    keep = rng.random(E) < 0.9
    in_a = relabelings(np.arange(U) < U // 2, None, 50, seed).in_a
    with mock.patch.object(null_module, "MIN_PATTERN", min_pattern):  # 1: every holding pattern takes the linear path
        mean, top = head_null(X, V, in_a, threshold, keep)
    ref_mean, ref_top = brute_null(X, V, in_a, threshold, keep)
    np.testing.assert_allclose(mean, ref_mean, rtol=2e-5, atol=1e-7)  # float32 products
    np.testing.assert_allclose(top, ref_top, rtol=2e-5, atol=1e-7)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([1, 16]))
def test_a_labeling_and_its_mirror_image_get_the_same_null_statistics(seed, min_pattern):
    """|D| is the same with the groups swapped: the null gives a labeling and its mirror image equal values
    (bit for bit, though float32 sums of the two would round apart), on both paths, and still matches the
    definition; so the observed labeling always ties its mirror image, as the smallest p assumes."""
    rng = np.random.default_rng(seed)
    U, H, E = 8, 2, 40
    V = (rng.random((U, E)) < 0.9).astype(float)
    X = (5 + rng.random((U, H, E)) * 1e-3) * V[:, None]  # large means, small differences: float32 cancellation
    r = relabelings(np.arange(U) < U // 2, None, n=999)
    assert r.exact and r.mirrored
    with mock.patch.object(null_module, "MIN_PATTERN", min_pattern):
        mean, top = head_null(X, V, r.in_a, 2, None)
    rows = {row.tobytes(): i for i, row in enumerate(r.in_a)}
    mirror = np.array([rows[(~row).tobytes()] for row in r.in_a])
    np.testing.assert_array_equal(mean, mean[mirror])
    np.testing.assert_array_equal(top, top[mirror])
    ref_mean, ref_top = brute_null(X, V, r.in_a, 2, np.ones(E, dtype=bool))
    # float32 sums of values ~5 (ulp ~5e-7) for differences ~3e-4
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-2)
    np.testing.assert_allclose(top, ref_top, rtol=1e-2)
    assert permutation_p(mean)[0] >= 2 / len(mean)  # the observed labeling ties its mirror image


def test_relabelings_exact_enumeration_and_strata():
    r = relabelings(np.arange(6) < 3, None, n=999)
    assert r.exact and r.distinct == 20 and r.n == 19 and r.mirrored and r.min_p == pytest.approx(0.1)
    assert len({tuple(row) for row in r.in_a}) == 20 and (r.in_a.sum(1) == 3).all()
    strata = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    in_a = np.array([1, 1, 0, 0, 1, 0, 0, 0], dtype=bool)
    r = relabelings(in_a, strata, n=999)
    assert r.distinct == math.comb(4, 2) * math.comb(4, 1) and r.exact
    assert not r.mirrored and r.min_p == pytest.approx(1 / 24)  # 1 of 4 in the second stratum: no mirror image
    assert (r.in_a[:, :4].sum(1) == 2).all() and (r.in_a[:, 4:].sum(1) == 1).all()
    mc = relabelings(np.arange(40) < 20, np.arange(40) % 2, n=300, seed=1)
    assert not mc.exact and mc.n == 300 and np.array_equal(mc.in_a[0], np.arange(40) < 20)
    assert (mc.in_a[:, ::2].sum(1) == 10).all() and (mc.in_a[:, 1::2].sum(1) == 10).all()


def brute_westfall_young(stat):
    """Single-step min-P from its definition, with loops; values within RTOL of each other tie (as in
    permutation_p: sums of the same terms in another order differ in the last bits)."""
    from attnprof.statistics.multiplicity import RTOL

    total, K = stat.shape
    p = np.array([[np.mean(stat[:, k] >= stat[j, k] - RTOL * abs(stat[j, k])) for k in range(K)] for j in range(total)])
    return np.array([np.mean(p.min(1) <= p[0, k]) for k in range(K)])


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_permutation_p_and_westfall_young_match_their_definitions(seed):
    rng = np.random.default_rng(seed)
    stat = rng.random((int(rng.integers(5, 60)), int(rng.integers(1, 8))))
    stat[0] += rng.random(stat.shape[1]) * rng.choice([0, 0.5, 2])
    p = permutation_p(stat)
    np.testing.assert_allclose(p, [(1 + np.sum(stat[1:, k] >= stat[0, k])) / len(stat) for k in range(stat.shape[1])])
    adjusted = westfall_young(stat)
    np.testing.assert_allclose(adjusted, brute_westfall_young(stat))
    assert np.all(adjusted >= p - 1e-12)
    np.testing.assert_allclose(westfall_young(stat[:, :1]), p[:1])  # one hypothesis: nothing to adjust


def test_mean_square_diff_is_unbiased_where_mean_abs_diff_grows_with_n():
    rng = np.random.default_rng(0)
    delta = rng.normal(0, 0.3, size=200)  # true differences of 200 elements
    mean_abs = {}
    for n in (4, 16):
        msd, absd = [], []
        for _ in range(400):
            a = delta + rng.normal(0, 1, size=(n, 200))
            b = rng.normal(0, 1, size=(n, 200))
            d = a.mean(0) - b.mean(0)
            se = np.sqrt(a.var(0, ddof=1) / n + b.var(0, ddof=1) / n)
            msd.append(mean_square_diff(d, se)[0])
            absd.append(np.abs(d).mean())
        # unbiased: within 4 standard errors of the mean over 400 experiments, at either n
        assert abs(np.mean(msd) - np.mean(delta**2)) < 4 * np.std(msd) / np.sqrt(len(msd)), n
        mean_abs[n] = np.mean(absd)
    assert mean_abs[4] > 1.5 * mean_abs[16]  # mean |D| moves with n: it measures the noise too


# ------------------------------------------------------------------ blocks
def test_a_replicate_in_two_groups_is_refused_naming_it():
    codes = np.array([0, 0, 1, 1])
    with pytest.raises(ValueError, match="replicate 'm7' has cells in group 'female' and 'male'"):
        design_blocks(codes, ["female", "male"], np.array(["f1", "m7", "m7", "m2"]))
    with pytest.raises(ValueError, match="strata must be coarser"):
        design_blocks(codes, ["female", "male"], np.array(["f1", "f1", "m1", "m2"]), np.array(["s1", "s2", "s1", "s1"]))
    blocks, block_codes = design_blocks(codes, ["female", "male"], np.array(["f1", "f2", "m1", "m1"]))
    assert blocks.names == ("f1", "f2", "m1") and blocks.group == (0, 0, 1) and list(block_codes) == [0, 1, 2, 2]


def test_pseudo_replicates_deal_each_group_evenly():
    codes = np.repeat([0, 1], [37, 20])
    blocks, block_codes = design_blocks(codes, ["a", "b"], per_group=8, seed=3)
    assert blocks.pseudo and len(blocks) == 16
    per_block = np.bincount(block_codes, minlength=16)
    assert per_block[:8].min() >= 4 and per_block[:8].max() <= 5 and per_block[8:].min() >= 2
    assert np.array_equal(block_codes // 8, codes)


# ------------------------------------------------------------------ simulated experiments
H_MODEL, D_MODEL, L = 2, 8, 6


def tiny_model(seed: int) -> torch.nn.TransformerEncoder:
    """One layer, two heads. Head 1 alone reads dimension 7, where the group effect is planted."""
    torch.manual_seed(seed)
    layer = torch.nn.TransformerEncoderLayer(D_MODEL, H_MODEL, 16, dropout=0.0, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()
    attn = model.layers[0].self_attn
    with torch.no_grad():
        attn.in_proj_weight[:, 7] = 0  # no head reads dimension 7 ...
        hd = D_MODEL // H_MODEL
        k1 = slice(D_MODEL + hd, D_MODEL + 2 * hd)
        attn.in_proj_weight[k1] = 0
        attn.in_proj_weight[k1.start, 7] = 3.0  # ... but head 1's keys
        attn.in_proj_weight[hd, :] = 0
        attn.in_proj_bias[hd] = 1.0  # a constant query in head 1
    return model


def simulate(rng, n_datasets, group_effect: float, animals=6, cells=8, animal_sd=1.0):
    """Cells of 2·animals animals per dataset; an animal effect on every token's embedding (both heads);
    the group effect (if any) on dimension 7 of each token, read by head 1 only."""
    token_emb = rng.normal(size=(L, D_MODEL))
    token_emb[:, 7] = 0
    u = rng.normal(size=L)  # which tokens the group effect favours
    out = []
    for d in range(n_datasets):
        sex = rng.permutation(np.repeat([0, 1], animals))
        offsets = rng.normal(0, animal_sd, size=(2 * animals, L, D_MODEL))
        offsets[..., 7] = 0
        x, names, groups = [], [], []
        for a in range(2 * animals):
            e = token_emb + offsets[a] + rng.normal(0, 0.3, size=(cells, L, D_MODEL))
            e[..., 7] += group_effect * sex[a] * u
            x.append(e)
            names += [f"d{d}a{a}"] * cells
            groups += [f"d{d}:{sex[a]}"] * cells
        out.append((np.concatenate(x), names, groups))
    return out


def profile_datasets(model, datasets, replicate: bool):
    groups = sorted({g for _, _, gs in datasets for g in gs})
    reps = {n: g for _, ns, gs in datasets for n, g in zip(ns, gs)} if replicate else None
    with attnprof.Profiler(model, groups=groups, window=L, replicates=reps, backend="torch") as prof, \
            torch.inference_mode():  # fmt: skip
        for x, names, gs in datasets:
            prof.set_batch(groups=gs, replicates=names if replicate else None)
            model(torch.as_tensor(x, dtype=torch.float32))
    return prof.profile


@pytest.fixture(scope="module")
def null_experiments():
    rng = np.random.default_rng(7)
    model = tiny_model(0)
    datasets = simulate(rng, 100, group_effect=0.0, cells=4)
    return profile_datasets(model, datasets, True), profile_datasets(model, datasets, False), len(datasets)


def test_animal_effect_without_group_effect_gives_five_percent_at_the_replicate_level(null_experiments):
    by_replicate, by_cell, n = null_experiments
    rates = {}
    for name, profile in (("replicate", by_replicate), ("cell", by_cell)):
        hits = {"head": 0, "layer": 0}
        for d in range(n):
            c = profile.compare(f"d{d}:0", f"d{d}:1", min_cells=2, permutations=99, seed=d)
            hits["head"] += int(c.heads["p_perm_mean_abs_diff"].iloc[0] < 0.05)
            hits["layer"] += int(c.layers["p_perm_mean_abs_diff"].iloc[0] < 0.05)
        rates[name] = {k: v / n for k, v in hits.items()}
    print(f"\nrate of p < 0.05 over {n} null datasets (6 vs 6 animals with an animal effect): {rates}")
    # binomial(100, 0.05): P(X <= 12) > 0.999; the cell-level test (cells as replicates) rejects far more often
    assert rates["replicate"]["head"] <= 0.12 and rates["replicate"]["layer"] <= 0.12
    assert rates["cell"]["head"] >= 0.5 and rates["cell"]["layer"] >= 0.5


def test_a_group_effect_in_every_animal_ranks_the_planted_head_first():
    rng = np.random.default_rng(11)
    profile = profile_datasets(tiny_model(0), simulate(rng, 1, group_effect=1.5, animal_sd=0.5), True)
    c = profile.compare("d0:0", "d0:1", min_cells=2, permutations=999)
    assert c.exact and c.permutations == 923
    top = c.ranked_heads("position").iloc[0]
    assert (top["layer"], top["head"]) == (0, 1)
    assert top["p_fwer_mean_abs_diff"] <= 0.05
    other = c.heads[(c.heads["family"] == "position") & (c.heads["head"] == 0)].iloc[0]
    assert other["p_fwer_mean_abs_diff"] > top["p_fwer_mean_abs_diff"]


# ------------------------------------------------------------------ the tables, end to end
def profile_from_cells(values, present, block, groups_of_block, names, n_groups=2):
    """A Profile whose position family holds per-cell values [cells, H, W*W] (present [cells, W*W])."""
    B = len(groups_of_block)
    cells, H, E = values.shape
    W = int(round(np.sqrt(E)))
    sums, sq, counts = cells_to_blocks(values, present, block, B)
    n_cells = np.bincount(block, minlength=B).astype(float)
    summary = np.zeros((1, B, H, 4))
    profile = attnprof.Profile(
        {"pos_sum": sums.reshape(1, B, H, W, W), "pos_sq": sq.reshape(1, B, H, W, W),
         "pos_count": counts.reshape(1, B, W, W), "cells": n_cells[None],
         "summary_sum": summary, "summary_sq": summary},
        layers=["layer0"], groups=["a", "b"][:n_groups], n_heads=H, window=W,
        blocks=Blocks(tuple(groups_of_block), tuple(names), None, False),
    )  # fmt: skip
    return profile


@settings(max_examples=8, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(3, 4), st.integers(3, 4))
def test_heads_table_equals_an_independent_computation_from_per_cell_values(seed, ra, rb):
    """mean |D|, mean(D² − SE²), max |t| and where, and p_perm of every head, recomputed from per-cell values
    with scipy and a loop over every relabeling of the replicates."""
    rng = np.random.default_rng(seed)
    H, W = 2, 2
    B = ra + rb
    per = rng.integers(2, 6, size=B)
    block = np.repeat(np.arange(B), per)
    values = rng.random((len(block), H, W * W)) + rng.normal(0, 0.3, size=(B, H, W * W))[block]
    present = rng.random((len(block), W * W)) < 0.9
    groups = [0] * ra + [1] * rb
    profile = profile_from_cells(values, present, block, groups, [f"r{i}" for i in range(B)])
    cmp = profile.compare("a", "b", min_cells=2, permutations=10_000)
    assert cmp.unit == "replicate" and cmp.exact and cmp.permutations == math.comb(B, ra) - 1

    def replicate_means(in_a):
        """Per head: D, SE, t of each element from replicate means, with the replicates of a as given."""
        out = []
        for h in range(H):
            rows = []
            for e in range(W * W):
                means = {True: [], False: []}
                for b in range(B):
                    held = (block == b) & present[:, e]
                    if held.sum() >= 2:
                        means[bool(in_a[b])].append(values[held, h, e].mean())
                a, b_ = np.array(means[True]), np.array(means[False])
                if len(a) < 2 or len(b_) < 2:
                    continue
                se = np.sqrt(a.var(ddof=1) / len(a) + b_.var(ddof=1) / len(b_))
                t = stats.ttest_ind(a, b_, equal_var=False).statistic
                rows.append((e, a.mean() - b_.mean(), se, t))
            out.append(rows)
        return out

    observed = replicate_means(np.array(groups) == 0)
    heads = cmp.heads.set_index("head")
    for h, rows in enumerate(observed):
        if not rows:
            assert np.isnan(heads.loc[h, "mean_abs_diff"])
            continue
        e, d, se, t = (np.array(x) for x in zip(*rows))
        assert heads.loc[h, "n_elements"] == len(rows)
        np.testing.assert_allclose(heads.loc[h, "mean_abs_diff"], np.abs(d).mean(), rtol=1e-9)
        np.testing.assert_allclose(heads.loc[h, "mean_sq_diff"], np.mean(d**2 - se**2), rtol=1e-7, atol=1e-12)
        np.testing.assert_allclose(heads.loc[h, "rms_diff"], np.sqrt(max(np.mean(d**2 - se**2), 0)), rtol=1e-7)
        finite = np.isfinite(t)
        if finite.any():
            np.testing.assert_allclose(heads.loc[h, "max_abs_t"], np.abs(t[finite]).max(), rtol=1e-7)
            i, j = divmod(int(e[finite][np.abs(t[finite]).argmax()]), W)
            assert heads.loc[h, "max_t_where"] == f"{i},{j}"
        # p_perm: every relabeling of the replicates, one at a time
        null = []
        for chosen in itertools.combinations(range(B), ra):
            in_a = np.isin(np.arange(B), chosen)
            rows_k = replicate_means(in_a)[h]
            null.append(np.abs([r[1] for r in rows_k]).mean() if rows_k else np.nan)
        null = np.array(null)
        obs = np.abs(d).mean()
        expected = np.sum(null >= obs * (1 - 1e-6)) / len(null)  # the observed labeling among them
        np.testing.assert_allclose(heads.loc[h, "p_perm_mean_abs_diff"], expected, rtol=1e-12)
