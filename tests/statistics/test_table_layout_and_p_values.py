"""Tests that kill the mutants mutmut left alive in profiler/tables.py (``scripts/mutation.sh tables``):
(profiles here keep one block per group, ``pseudo_replicates=1``, so that a group's sums are its block's)
the tables' schema (names, order, dtypes), their row order (untested rows last, ties in layer, head,
element order), their values against the sums (noise floor included), the layers' ``where``, the AnnData
export, the files ``save`` writes, the special-token names, ``ranked_heads`` against its definition, and
the permutation nulls against their definition (a permutation's statistic is the one the same cells show
when recorded with that labeling). Behaviour through public functions only.

Mutants left alive on purpose, because they are equivalent:

- warnings only: every ``np.errstate(...)`` argument, ``warnings.simplefilter("ignore", RuntimeWarning)``
  -> without the category.
- numpy and pandas read them the same: ``reshape(..., -1)`` -> ``-2`` (any negative size is "the rest");
  ``flat(..., heads=False)`` -> None; ``dtype=object``/``bool``/``int``/``float`` -> None or dropped where
  the values are strings, bools, ints or floats already (gene names, the special and keep masks, the panel,
  ``to_numpy`` of a float column, ``bh``'s ``asarray``); ``full_like(..., nan)`` and ``np.where(..., nan)``
  -> None in a float array (None becomes NaN); ``take_along_axis(..., -1)`` -> no axis (numpy's default
  is -1); ``groupby(sort=False)`` -> None; ``to_csv``/``to_parquet(index=False)`` -> None or dropped (the
  tables have a RangeIndex, which pandas then leaves out too); ``false_discovery_control(method="bh")``
  -> "BH" or dropped (scipy's default, case-insensitive); ``sort_values([two keys], kind="stable")`` ->
  any kind (pandas sorts on several keys with a stable lexsort whatever the kind).
- only NaN meets them: ``np.where(np.isnan(t), nan, p)`` -> ``np.where(None, ...)`` (the t sf of NaN is
  NaN); the element order's NaN fill for |t| (``nan=-1.0`` -> +1, -2 or 0: |t| is NaN only where p is
  NaN, rows that sort among themselves); p's NaN fill 2.0 -> 3.0, and ``ranked_heads``' NaN p fill 2.0 ->
  3.0 (p <= 1).
- ``len(name) > 1`` -> ``>= 1`` in ``is_special_token``: a one-character name has the same first and last
  character, never a bracket pair.
- ``c.valid[0, 0]``, ``n_a[0, 0]``, ``n_b[0, 0]`` -> index 1: counts are per cell, the same in every layer
  (a property of the sums the recorder writes).
- ``null.vocab_size or len(genes)`` -> ``and``: a profile's null has its vocabulary size equal to the
  number of gene names whenever both exist, so both give ``len(genes)``.
- ``parquet = False`` -> None/True in ``save``'s ``except ImportError``: pyarrow is a plain dependency,
  the branch never runs.
- ``"gene" in contrasts and genes is not None`` -> ``or``: gene sums exist exactly when the profile has
  gene names, so both sides are equal.

Not equivalent, and not killed (no input found in the time given; they need a degenerate value):

- a variance of exactly zero: ``_variance``'s ``total != 0`` -> ``!= 1`` and ``_variance(None, ...)`` in
  ``welch`` (an element whose values are all exactly 0 in a group), ``np.clip(var, 0)`` dropped (rounding
  makes a variance slightly negative), ``spread > 0`` / ``noise_floor > 0`` -> ``>= 0`` in
  ``ranked_heads`` (a null band or a noise floor of exactly 0), and its NaN-score fill ``-inf`` ->
  ``+inf`` (a NaN score next to a finite one in the same family needs such a zero).
- a head with exactly one element with a standard error: ``n_floor > 0`` -> ``> 1`` and
  ``maximum(n_floor, 1)`` -> 2 in the heads table.
- the element order's tie-break ``-|t|`` -> ``+|t|``: it decides only between rows of equal p with
  different |t|, which needs p to underflow to 0 for two elements.
- ``max(min_cells, 1)`` -> 2 for the second group in ``_null_statistics``: it needs, at min_cells=1, an
  element seen in exactly one cell of the second group under a permutation (the first group's twin is
  killed).
- ``ranked_heads`` single-key ``sort_values(kind="stable")`` -> quicksort: numpy sorts fewer than 17
  values by insertion, which is stable; a tie among 17+ heads of one family would show it.
"""

from __future__ import annotations

import dataclasses
import re
import warnings

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

import attnprof
from attnprof.kernels import SUMMARIES
from attnprof.blocks import Blocks
from attnprof.tables import DEFAULT_MIN_CELLS, HALF_NORMAL_MEAN, welch

LAYERS, HEADS, VOCAB, L = 3, 2, 12, 7  # layers != heads: a transposed index shows
GENES = [f"g{i}" for i in range(VOCAB)]
ELEMENT_COLUMNS = ["diff", "t", "p", "q", "n_a", "n_b", "mean_a", "mean_b"]  # genes, context, pairs
SUMMARY_COLUMNS = ["mean_a", "mean_b", "diff", "t", "p", "q", "n_a", "n_b"]


def make_profile(per_group: int = 1):
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(8, HEADS, 16, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False).eval()
    g = torch.Generator().manual_seed(2)
    n = 13
    x = torch.randn(n, L, 8, generator=g)
    tokens = torch.stack([torch.randperm(VOCAB - 1, generator=g)[:L] for _ in range(n)])  # g11 never occurs
    labels = [0] * 7 + [1] * 6
    with attnprof.Profiler(model, groups=["a", "b"], genes=GENES, window=4, panel=["g1", "g2", "g11"],
                           pseudo_replicates=per_group) as prof, torch.inference_mode():  # fmt: skip
        prof.set_batch(groups=labels, tokens=tokens)
        model(x)
    return prof.profile


@pytest.fixture(scope="module")
def profile():
    return make_profile()


@pytest.fixture
def cmp(profile):
    """Built in every test that uses it (not module-scoped): mutmut maps a mutant to the tests that call
    the mutated function, and a cached comparison would map it to the first such test only."""
    return profile.compare("b", "a", min_cells=3, permutations=0)


def test_every_table_has_its_columns_in_order(cmp):
    assert list(cmp.heads.columns) == ["layer", "head", "family", "unit", "n_a", "n_b", "cells_a", "cells_b",
                                       "n_elements", "mean_abs_diff", "noise_floor", "excess_over_noise",
                                       "mean_sq_diff", "rms_diff", "max_abs_diff", "where", "max_abs_t",
                                       "max_t_where", "max_abs_t_cells", "min_q"]  # fmt: skip
    assert list(cmp.layers.columns) == ["layer", "layer_name", "family", "unit", "mean_abs_diff", "noise_floor",
                                        "excess_over_noise", "mean_sq_diff", "rms_diff", "max_abs_diff",
                                        "max_head_mean_abs_diff", "max_head", "where", "max_abs_t", "max_t_head",
                                        "max_t_where"]  # fmt: skip
    assert list(cmp.genes.columns) == ["layer", "head", "gene", *ELEMENT_COLUMNS, "token_id"]
    assert list(cmp.context.columns) == ["layer", "head", "token", *ELEMENT_COLUMNS, "token_id"]
    assert list(cmp.pairs.columns) == ["layer", "head", "gene_a", "gene_b", *ELEMENT_COLUMNS]
    assert list(cmp.summaries.columns) == ["layer", "head", "summary", *SUMMARY_COLUMNS]
    assert cmp.context.empty  # g0..g11 are all genes: no context or special token
    for table in (cmp.genes, cmp.pairs, cmp.summaries):
        assert table["n_a"].dtype == np.int64 and table["n_b"].dtype == np.int64
    assert (cmp.heads["n_a"] == 6).all() and (cmp.heads["n_b"] == 7).all()  # b has 6 cells, a 7
    assert (cmp.summaries["n_a"] == 6).all() and (cmp.summaries["n_b"] == 7).all()


def test_tables_of_a_profile_without_genes_keep_the_element_columns():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, HEADS, 16, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()
    with attnprof.Profiler(model, groups=["a", "b"], window=3) as prof, torch.inference_mode():
        prof.set_batch(groups=[0, 1, 1])
        model(torch.randn(3, 5, 8))
    cmp = prof.profile.compare("a", "b")
    assert cmp.genes.empty and cmp.pairs.empty
    assert list(cmp.pairs.columns) == ["layer", "head", "gene_a", "gene_b", *ELEMENT_COLUMNS]
    # the empty gene and context tables: the columns of full ones, in order (token_id may be left out)
    for table, name in ((cmp.genes, "gene"), (cmp.context, "token")):
        full = ["layer", "head", name, *ELEMENT_COLUMNS, "token_id"]
        assert table.empty and list(table.columns) in (full, full[:-1])
    with pytest.raises(ValueError, match="^" + re.escape(
            "this profile has no gene statistics: profile with genes= (a vocabulary) to get them") + "$"):  # fmt: skip
        cmp.to_anndata()


def expected_contrast(profile, prefix, min_cells):
    s, ib, ia = profile.sums, 1, 0  # compare("b", "a")
    nl, nh = len(profile.layers), profile.n_heads
    flat = lambda name, g, k: s[f"{prefix}_{name}"][:, g].reshape(nl, k, -1)  # noqa: E731
    return welch(flat("sum", ib, nh), flat("sq", ib, nh), flat("count", ib, 1),
                 flat("sum", ia, nh), flat("sq", ia, nh), flat("count", ia, 1), min_cells)  # fmt: skip


def test_gene_and_pair_rows_hold_their_own_element_statistics(cmp, profile):
    for table in (cmp.genes, cmp.pairs):  # most significant first: Welch p rising (NaN last), then |t| falling
        p = table["p"].fillna(2.0).to_numpy()
        abs_t = table["t"].abs().fillna(-1.0).to_numpy()
        assert (np.diff(p) >= 0).all()
        assert (np.diff(abs_t)[np.diff(p) == 0] <= 0).all()
        assert table["p"].notna().sum() > 10  # the order is not vacuous (|t| only breaks ties such as p = 0)
        # every layer, head and valid element exactly once
        keys = ["layer", "head", "gene"] if "gene" in table else ["layer", "head", "gene_a", "gene_b"]
        assert not table.duplicated(keys).any()
        assert len(table) == LAYERS * HEADS * table.drop_duplicates(keys[2:]).shape[0]
    c = expected_contrast(profile, "recv", 3)
    for row in cmp.genes.sample(25, random_state=0).itertuples():
        e = GENES.index(row.gene)
        assert row.token_id == e
        for name in ("mean_a", "mean_b", "diff", "t", "p"):
            assert getattr(row, name) == pytest.approx(getattr(c, name)[row.layer, row.head, e], nan_ok=True), name
        assert (row.n_a, row.n_b) == (c.n_a[row.layer, 0, e], c.n_b[row.layer, 0, e])
        assert row.n_a >= 3 and row.n_b >= 3
    panel = ["g1", "g2", "g11"]
    c = expected_contrast(profile, "pair", 3)
    assert not cmp.pairs.empty and "g11" not in set(cmp.pairs["gene_a"]) | set(cmp.pairs["gene_b"])
    for row in cmp.pairs.itertuples():
        e = panel.index(row.gene_a) * 3 + panel.index(row.gene_b)
        assert row.mean_a == pytest.approx(c.mean_a[row.layer, row.head, e])
        assert row.mean_b == pytest.approx(c.mean_b[row.layer, row.head, e])
        assert row.t == pytest.approx(c.t[row.layer, row.head, e], nan_ok=True)


def test_summary_rows_run_layer_then_head_then_summary(cmp, profile):
    s = cmp.summaries
    ns = len(SUMMARIES)
    np.testing.assert_array_equal(s["layer"], np.repeat(np.arange(LAYERS), HEADS * ns))
    np.testing.assert_array_equal(s["head"], np.tile(np.repeat(np.arange(HEADS), ns), LAYERS))
    np.testing.assert_array_equal(s["summary"], np.tile(SUMMARIES, LAYERS * HEADS))
    n = profile.sums["cells"]
    mean = profile.sums["summary_sum"] / n[:, :, None, None]
    np.testing.assert_allclose(s["mean_a"], mean[:, 1].ravel())  # a = "b", the second group
    np.testing.assert_allclose(s["mean_b"], mean[:, 0].ravel())
    np.testing.assert_allclose(s["diff"], (mean[:, 1] - mean[:, 0]).ravel())
    varied = s["summary"] != "context_mass"  # no context tokens here: context mass is 0 in every cell, t undefined
    assert s.loc[varied, "t"].notna().all() and s.loc[~varied, "t"].isna().all()
    assert s.loc[varied, "q"].between(0, 1).all()


def test_anndata_export_layout(cmp):
    adata = cmp.to_anndata()
    assert list(adata.obs_names) == [f"L{l}H{h}" for l in range(LAYERS) for h in range(HEADS)]
    assert list(adata.obs.columns) == ["layer", "head"]
    assert adata.obs["layer"].tolist() == [0, 0, 1, 1, 2, 2] and adata.obs["head"].tolist() == [0, 1] * 3
    assert adata.var.index.name == "gene" and list(adata.var.columns) == ["token_id", "n_a", "n_b"]
    assert all(adata.var[c].dtype == np.int64 for c in ("token_id", "n_a", "n_b"))
    assert sorted(adata.layers) == ["mean_a", "mean_b", "t"]
    assert adata.uns["attnprof"] == {"a": "b", "b": "a", "min_cells": 3, "unit": "cell"}
    genes = cmp.genes.query("layer == 1 and head == 1").set_index("gene")
    row = adata.obs_names.get_loc("L1H1")
    for name in ("mean_a", "mean_b", "t"):
        np.testing.assert_allclose(adata[row, genes.index].layers[name].ravel(), genes[name], err_msg=name)
    np.testing.assert_array_equal(adata.var.loc[genes.index, "n_a"], genes["n_a"])
    np.testing.assert_array_equal(adata.var.loc[genes.index, "n_b"], genes["n_b"])
    np.testing.assert_array_equal(adata.var.loc[genes.index, "token_id"], genes["token_id"])


def test_save_writes_plain_files_into_a_new_nested_folder(cmp, tmp_path):
    folder = cmp.save(tmp_path / "run" / "tables")
    assert folder == tmp_path / "run" / "tables"
    for name, table in cmp.tables().items():
        assert (folder / f"{name}.csv").read_text().splitlines()[0] == ",".join(table.columns)  # no index column
        assert pq.read_schema(folder / f"{name}.parquet").names == list(table.columns)  # no index column either
    assert (folder / "genes.h5ad").exists()


def test_permutation_p_values_count_ties_and_keep_undefined_heads_undefined(profile):
    """One block per group: the only relabeling swaps the groups, whose |D| ties the observed one exactly."""
    cmp = profile.compare("b", "a", min_cells=4, permutations=5)
    assert cmp.exact and cmp.permutations == 1
    for table in (cmp.heads, cmp.layers):
        for col in ("mean_abs_diff", "max_abs_diff"):
            p = table[f"p_perm_{col}"]
            defined = table[col].notna()
            assert (p[defined] == 1.0).all(), (col, p[defined])  # a tie counts as at least as large
            assert p[~defined].isna().all()
            # the null's products run in float32 (attnprof.statistics.null): to about 1e-6 of the float64 tables
            np.testing.assert_allclose(table[f"{col}_null_mean"][defined], table[col][defined], rtol=1e-5)
            np.testing.assert_allclose(table[f"{col}_excess"][defined], 0, atol=1e-6 * table[col][defined].max())
    assert cmp.heads["mean_abs_diff"].isna().any()  # the gene g11 never occurs: its pair rows are undefined
    with pytest.raises(ValueError, match=re.escape("permutations must be >= 0 (0: no permutation null) and at most")):
        profile.compare("b", "a", permutations=-1)


def test_heads_and_layers_summaries_and_their_empty_rows(profile):
    default = attnprof.compare(profile, "b", "a")  # defaults: DEFAULT_MIN_CELLS, all relabelings (1 here)
    assert default.min_cells == DEFAULT_MIN_CELLS and default.permutations == 1 and default.unit == "cell"
    assert "p_perm_mean_abs_diff" in default.heads.columns
    assert default.heads["n_elements"].eq(0).all()  # b has 6 cells, fewer than the default 10
    cmp = attnprof.compare(profile, "b", "a", min_cells=1, permutations=0)
    heads = cmp.heads
    assert list(heads.index) == list(range(len(heads)))  # one table, not three stacked indexes
    assert list(dict.fromkeys(heads["family"])) == ["position", "gene", "pair"]
    for family, rows in heads.groupby("family", sort=False):
        c = cmp.contrasts[family]
        absd = np.abs(c.diff)  # NaN where not valid
        n_el = np.broadcast_to(c.valid, absd.shape).sum(-1)
        with np.errstate(invalid="ignore"):
            mean_abs = np.nanmean(absd, -1)
        np.testing.assert_allclose(rows["n_elements"], n_el.ravel())
        np.testing.assert_allclose(rows["mean_abs_diff"], mean_abs.ravel(), equal_nan=True)
        with np.errstate(invalid="ignore"):  # the expected |D| without a difference, over elements with an SE
            floor = np.nanmean(HALF_NORMAL_MEAN * c.se, -1)
        assert np.isfinite(floor).any()
        np.testing.assert_allclose(rows["noise_floor"], floor.ravel(), equal_nan=True)
        np.testing.assert_allclose(rows["excess_over_noise"], (mean_abs - floor).ravel(), equal_nan=True)
        np.testing.assert_allclose(rows["max_abs_diff"], np.nanmax(absd, -1).ravel(), equal_nan=True)
        np.testing.assert_allclose(rows["max_abs_t"], np.nanmax(np.abs(c.t), -1).ravel(), equal_nan=True)
        np.testing.assert_allclose(rows["min_q"], np.nanmin(c.q, -1).ravel(), equal_nan=True)
    layers = cmp.layers
    assert list(zip(layers["family"], layers["layer"])) == [(f, l) for f in ("position", "gene", "pair")
                                                           for l in range(LAYERS)]  # fmt: skip
    by_layer = heads.groupby(["family", "layer"], sort=False)
    for col in ("mean_abs_diff", "noise_floor", "excess_over_noise"):  # means over heads
        np.testing.assert_allclose(layers[col], by_layer[col].mean().to_numpy(), err_msg=col)
    np.testing.assert_allclose(layers["max_abs_diff"], by_layer["max_abs_diff"].max().to_numpy())
    # no element seen in min_cells cells of both groups: NaN summaries, head -1, empty "where"
    strict = profile.compare("b", "a", min_cells=7)  # b has 6 cells
    assert strict.heads["n_elements"].eq(0).all() and strict.heads["where"].eq("").all()
    assert strict.heads[["mean_abs_diff", "max_abs_diff", "max_abs_t", "min_q"]].isna().all().all()
    assert strict.layers["max_head"].eq(-1).all() and strict.layers["where"].eq("").all()
    # exactly min_cells cells in a group is enough
    assert profile.compare("b", "a", min_cells=6).heads.query("family == 'position'")["n_elements"].gt(0).all()


def test_welch_boundaries():
    """n = min_cells is valid, one fewer is not; one cell per group gives a difference but no t."""
    sums = dict(sum_a=np.array([3.0]), sq_a=np.array([5.0]), sum_b=np.array([1.0]), sq_b=np.array([1.0]))
    one = welch(sums["sum_a"], sums["sq_a"], np.array([1.0]), sums["sum_b"], sums["sq_b"], np.array([1.0]), 1)
    assert one.diff[0] == pytest.approx(2.0) and np.isnan(one.t[0]) and np.isnan(one.p[0])
    none = welch(sums["sum_a"], sums["sq_a"], np.array([2.0]), sums["sum_b"], sums["sq_b"], np.array([1.0]), 2)
    assert np.isnan(none.diff[0]) and not none.valid[0]
    a, b = np.array([1.0, 2.0, 4.0]), np.array([0.0, 0.5])
    c = welch(a.sum(), (a**2).sum(), 3.0, b.sum(), (b**2).sum(), 2.0, 2)
    from scipy import stats

    expected = stats.ttest_ind(a, b, equal_var=False)
    assert c.t == pytest.approx(expected.statistic) and c.p == pytest.approx(expected.pvalue)
    # all values equal within each group: zero standard error, no t, no p (not +-inf)
    flat = welch(4.0, 8.0, 2.0, 2.0, 2.0, 2.0, 1)
    assert flat.diff == pytest.approx(1.0) and np.isnan(flat.t) and np.isnan(flat.p)


# --- the permutation nulls against their definition, and ranked_heads against its definition ---------

CONTEXT_GENES = ["<ctx>", *GENES[1:]]  # token 0 is a context token: out of the gene family, in its nulls too


def record(labels, genes=CONTEXT_GENES, per_group=1):
    """The profile of make_profile's cells labeled ``labels`` (``per_group`` pseudo-replicate blocks)."""
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(8, HEADS, 16, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False).eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(13, L, 8, generator=g)
    tokens = torch.stack([torch.randperm(VOCAB - 1, generator=g)[:L] for _ in range(13)])
    with attnprof.Profiler(model, groups=["a", "b"], genes=genes, window=4, panel=["g1", "g2", "g11"],
                           pseudo_replicates=per_group) as prof, torch.inference_mode():  # fmt: skip
        prof.set_batch(groups=labels, tokens=tokens)
        model(x)
    return prof.profile


def relabeled(profile, cmp, row):
    """The profile with its units' groups as the relabeling ``row`` says (True: the comparison's a)."""
    ia, ib = profile.group_index(cmp.a), profile.group_index(cmp.b)
    group = np.array(profile.blocks.group)
    group[cmp._units] = np.where(row, ia, ib)
    return dataclasses.replace(profile, blocks=Blocks(tuple(int(g) for g in group), profile.blocks.names, None, True))


def check_null(cmp, permuted):
    """``cmp``'s null columns against ``permuted``, the comparisons of the same cells under each labeling."""
    for table in ("heads", "layers"):
        observed = getattr(cmp, table)
        extra = ("max_head_mean_abs_diff",) if table == "layers" else ()  # the other reading of the maximum
        for col in ("mean_abs_diff", "max_abs_diff", *extra):
            null = np.stack([getattr(p, table)[col].to_numpy(dtype=float) for p in permuted])  # [n, rows]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                mean, q95 = np.nanmean(null, 0), np.nanquantile(null, 0.95, axis=0)
            obs = observed[col].to_numpy(dtype=float)
            np.testing.assert_allclose(observed[f"{col}_null_mean"], mean, rtol=1e-5, equal_nan=True, err_msg=col)
            np.testing.assert_allclose(observed[f"{col}_null_q95"], q95, rtol=1e-5, equal_nan=True, err_msg=col)
            scale = np.nanmax(np.abs(obs)) if np.isfinite(obs).any() else 1.0  # float32 null: ~1e-6 of the statistic
            np.testing.assert_allclose(observed[f"{col}_excess"], obs - mean, rtol=1e-5, atol=1e-6 * scale,
                                       equal_nan=True)  # fmt: skip
            with np.errstate(invalid="ignore"):
                p = np.where(np.isnan(obs), np.nan, (1 + (null >= obs * (1 - 1e-6)).sum(0)) / (1 + len(permuted)))
            np.testing.assert_allclose(observed[f"p_perm_{col}"], p, equal_nan=True, err_msg=col)


def test_permutation_nulls_are_the_tables_of_the_relabeled_blocks():
    """A relabeling's statistic is the one the same blocks show when labeled by it: mean |D| and max |D| of
    every head and layer, over the same elements (seen in min_cells cells of both groups, context token
    apart), hence the null mean, 95th percentile, excess and p-value of each row."""
    data = record([0] * 7 + [1] * 6, per_group=7)  # one cell per block
    for min_cells in (1, 2, 5, 7):  # 7: no element anywhere (each labeling has a group of at most 6 cells)
        cmp = data.compare("b", "a", min_cells=min_cells, permutations=6, seed=3)
        rows = cmp.relabelings.in_a[1:]
        permuted = [relabeled(data, cmp, row).compare("b", "a", min_cells=min_cells, permutations=0) for row in rows]
        check_null(cmp, permuted)
        null = np.stack([p.heads["mean_abs_diff"].to_numpy(dtype=float) for p in permuted])
        if min_cells < 7:  # not vacuous: heads with elements, labelings that differ
            assert np.isfinite(null).any() and not np.allclose(null[0], null[1], equal_nan=True)
        else:
            assert np.isnan(null).all()


def test_special_tokens_are_named_by_their_brackets():
    from attnprof.tables import is_special_token

    for name in ("<ctx>", "[CLS]", "<>", "[]", "<a>", "[a]"):
        assert is_special_token(name), name
    for name in ("g1", "<", ">", "[", "<a", "a>", "[a", "a]", "<a]", "[a>", "a<b>", 7):
        assert not is_special_token(name), name


def test_ranked_heads_follow_their_definition():
    labels = [0] * 7 + [1] * 6
    for permutations in (0, 3):
        cmp = record(labels, per_group=7).compare("b", "a", min_cells=2, permutations=permutations)
        for family in ("position", "gene", "pair"):
            heads = cmp.heads[cmp.heads["family"] == family]
            ranked = cmp.ranked_heads(family)
            assert sorted(ranked.index) == list(heads.index) and list(ranked.columns) == list(heads.columns)
            if permutations:
                spread = heads["mean_abs_diff_null_q95"] - heads["mean_abs_diff_null_mean"]
                score = [e / s if s > 0 else -np.inf for e, s in zip(heads["mean_abs_diff_excess"], spread)]
                keys = [(2.0 if np.isnan(f) else f, 2.0 if np.isnan(p) else p, -(-np.inf if np.isnan(s) else s), i)
                        for f, p, s, i in zip(heads["p_fwer_mean_abs_diff"], heads["p_perm_mean_abs_diff"], score,
                                              heads.index)]  # fmt: skip
            else:
                score = [e / f if f > 0 else np.nan for e, f in zip(heads["excess_over_noise"], heads["noise_floor"])]
                keys = [(-(-np.inf if np.isnan(s) else s), 0, i) for s, i in zip(score, heads.index)]
            assert list(ranked.index) == [k[-1] for k in sorted(keys)], (family, permutations)
        # the order is not vacuous: the heads are not already in it
        assert list(cmp.ranked_heads("position").index) != list(cmp.heads.query("family == 'position'").index)
    assert cmp.ranked_heads().equals(cmp.ranked_heads("gene"))  # the default family


def test_undefined_rows_come_last_and_ties_keep_layer_head_element_order():
    """With min_cells=1 and two cells in b, elements seen in one cell of b have a difference but no t and
    p: they come after every tested row, in layer, head, element order (the sort is stable)."""
    cmp = record([0] * 11 + [1] * 2).compare("b", "a", min_cells=1, permutations=0)
    assert list(cmp.tables()) == ["heads", "layers", "genes", "context", "pairs", "summaries"]
    for table, element in ((cmp.genes, "token_id"), (cmp.pairs, None)):
        untested = table["p"].isna().to_numpy()
        if table is cmp.genes:
            assert untested.any() and (~untested).any()
        assert not untested[: (~untested).sum()].any()  # NaN p last
        tail = table[untested]
        assert tail["t"].isna().all()
        if element is None:  # pairs: element = gene_a, gene_b in panel order
            panel = ["g1", "g2", "g11"]
            key = tail["gene_a"].map(panel.index) * len(panel) + tail["gene_b"].map(panel.index)
        else:
            key = tail[element]
        order = list(zip(tail["layer"], tail["head"], key))
        assert order == sorted(order) and len(set(tail["layer"])) == LAYERS


def test_layers_name_where_their_maximum_is(profile):
    cmp = profile.compare("b", "a", min_cells=2)
    layers, heads = cmp.layers, cmp.heads.set_index(["family", "layer", "head"])
    assert layers["max_head"].ge(0).all()
    for row in layers.itertuples():
        best = heads.loc[(row.family, row.layer, row.max_head)]
        assert row.where == best["where"] != "" and row.max_abs_diff == best["max_abs_diff"]
