"""Figures: the computing functions give the right arrays; the figures carry titles, labels, legends, colorbars."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnprof.plots import (
    attention_map,
    head_matrix,
    plot_attention_maps,
    plot_head_differences,
    plot_head_gallery,
    plot_layer_differences,
    save_figures,
    strongest_head,
)
from attnprof.singlecell import profile_anndata, small_nicheformer
from attnprof.singlecell.demo import demo_vocabulary, make_demo_data, technology_means


@pytest.fixture(scope="module")
def comparison():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread avoids waiting on busy cores
    try:
        adata = make_demo_data(n_cells=60, n_genes=50, seed=7)
        vocab = demo_vocabulary(adata, seed=7)
        model = small_nicheformer(vocab.n_tokens, seed=7, n_layers=2, context_length=40)
        profile = profile_anndata(model, adata, "sex", vocab=vocab, means=technology_means(adata, vocab),
                                  panel=["Esr1", "Ar", "Pgr"], window=40, progress=False)  # fmt: skip
    finally:
        torch.set_num_threads(n)
    return profile.compare("female", "male", permutations=199)


def test_attention_map_is_the_group_mean(comparison):
    p = comparison.profile
    m = attention_map(p, "male", layer=1, head=2)
    count = p.group_sums()["pos_count"][1, 1]
    seen = count > 0
    np.testing.assert_allclose(m[seen], p.group_sums()["pos_sum"][1, 1, 2][seen] / count[seen])
    assert np.isnan(m[~seen]).all()
    # the window (40) covers the whole context (40): each cell's context rows sum to 1
    np.testing.assert_allclose(p.group_sums()["pos_sum"][1, 1, 2, :3].sum(-1), p.cells["male"], rtol=1e-5)
    with pytest.raises(ValueError, match="head 4 is out of range"):
        attention_map(p, "male", layer=0, head=4)


def test_head_matrix_and_strongest_head_follow_the_heads_table(comparison):
    heads = comparison.heads
    m = head_matrix(comparison, "gene", "max_abs_diff")
    assert m.shape == (2, 4)
    row = heads[(heads["family"] == "gene") & (heads["layer"] == 1) & (heads["head"] == 3)]
    assert m[1, 3] == row["max_abs_diff"].item()
    best = comparison.ranked_heads("gene").iloc[0]
    assert strongest_head(comparison) == (best["layer"], best["head"])
    assert best["p_perm_mean_abs_diff"] == heads.query("family == 'gene'")["p_perm_mean_abs_diff"].min()


def labels(ax):
    return ax.get_title(), ax.get_xlabel(), ax.get_ylabel()


def test_layer_difference_figure_reads_well(comparison):
    fig = plot_layer_differences(comparison)
    axes = [ax for ax in fig.axes if ax.lines]
    assert len(axes) == 6  # families x (average, maximum)
    families = ["position maps (first 40 positions)", "attention received per gene", "panel gene pairs"]
    for ax, (family, stat) in zip(axes, [(f, s) for f in families for s in ("average", "maximum")]):
        assert ax.get_title().startswith(f"{family} — {stat}")
        assert ax.get_ylabel() == "|difference| (attention probability)"
        assert ax.get_ylim()[0] == 0  # magnitudes from zero
        assert ax.collections, "the null band is drawn"
    assert axes[-1].get_xlabel() == "layer"
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["below the permutation null's 95th percentile", "permutation null mean",
                      "noise floor, mean of √(2/π)·SE", "observed female − male (colour: family)"]  # fmt: skip
    gene_avg = axes[2]
    observed = gene_avg.lines[-1]
    assert list(observed.get_ydata()) == list(comparison.layers.query("family == 'gene'")["mean_abs_diff"])
    null_mean, floor = gene_avg.lines[0], gene_avg.lines[1]
    assert list(null_mean.get_ydata()) == list(comparison.layers.query("family == 'gene'")["mean_abs_diff_null_mean"])
    assert list(floor.get_ydata()) == list(comparison.layers.query("family == 'gene'")["noise_floor"])
    assert "female vs male" in fig._suptitle.get_text() and "199 relabelings of whole pseudo-replicates" in fig._suptitle.get_text()


def test_figures_without_permutations_show_the_noise_floor(comparison):
    plain = comparison.profile.compare("female", "male", permutations=0)
    fig = plot_layer_differences(plain)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "noise floor, mean of √(2/π)·SE", "observed female − male (colour: family)"]  # fmt: skip
    heat = plot_head_differences(plain)
    assert not any(ax.patches for ax in heat.axes)  # no null: no outlines


def test_attention_map_figure_reads_well(comparison):
    fig = plot_attention_maps(comparison.profile, layer=0, head=1, groups=["female", "male"])
    images = [ax for ax in fig.axes if ax.images]
    colorbars = [ax for ax in fig.axes if not ax.images]
    assert len(images) == 3 and len(colorbars) == 3
    assert [ax.get_title() for ax in images] == ["female (n = 30 cells)", "male (n = 30 cells)",
                                                 "difference female − male"]  # fmt: skip
    assert all(ax.get_xlabel() == "key position" and ax.get_ylabel() == "query position" for ax in images)
    assert "mean attention probability" in colorbars[0].get_ylabel()
    shown = images[0].images[0].get_array().filled(np.nan)
    np.testing.assert_allclose(shown, attention_map(comparison.profile, "female", 0, 1))
    assert "layer 0" in fig._suptitle.get_text() and "head 1" in fig._suptitle.get_text()
    caption = fig.texts[-1].get_text()
    assert "dashed lines: end of the 3 context tokens" in caption and "colour scale from 0" in caption
    assert "difference: symmetric scale" in caption
    assert all(ax.images[0].norm.vmin == 0 for ax in images[:2])


def test_every_group_side_by_side_and_a_gallery_of_heads(comparison):
    p = comparison.profile
    fig = plot_attention_maps(p, layer=1, head=0, groups=["male", "female"])
    assert [ax.get_title() for ax in fig.axes if ax.images][:2] == ["male (n = 30 cells)", "female (n = 30 cells)"]
    gallery = plot_head_gallery(p, "female", [(0, 1), (1, 3), (1, 0)])
    shown = [ax for ax in gallery.axes if ax.images]
    assert [ax.get_title() for ax in shown] == ["layer 0, head 1", "layer 1, head 3", "layer 1, head 0"]
    np.testing.assert_allclose(shown[1].images[0].get_array().filled(np.nan), attention_map(p, "female", 1, 3))
    assert len({ax.images[0].norm.vmax for ax in shown}) == 1  # one colour scale
    assert "attention probability" in gallery.axes[-1].get_ylabel()  # the shared colourbar
    with pytest.raises(ValueError, match="head 9 is out of range"):
        plot_head_gallery(p, "female", [(0, 9)])


def test_head_difference_figure_reads_well(comparison):
    fig = plot_head_differences(comparison)
    images = [ax for ax in fig.axes if ax.images]
    assert [labels(ax) for ax in images] == [
        ("mean |difference|", "head", "layer"),
        ("max |difference|", "head", "layer"),
    ]
    assert all(ax.images[0].norm.vmin == 0 for ax in images)
    found = head_matrix(comparison, "gene", "p_fwer_mean_abs_diff") <= 0.05
    assert len(images[0].patches) == found.sum()  # outlined heads: family-wise adjusted p <= 0.05
    assert fig.legends[0].get_texts()[0].get_text() == (
        "outlined: family-wise adjusted p ≤ 0.05 (cells as replicates; Westfall–Young over 2 x 4 heads)")
    assert "attention received per gene" in fig._suptitle.get_text()
    np.testing.assert_allclose(images[1].images[0].get_array(), head_matrix(comparison, "gene", "max_abs_diff"))
    assert len(images[0].texts) == 8  # the values are printed on a small grid


def test_save_figures_writes_png_and_pdf(comparison, tmp_path):
    written = save_figures(comparison.profile, comparison, tmp_path, layer=1, head=0, gallery=[(0, 0), (1, 1)])
    assert sorted(p.name for p in written) == sorted(
        f"{n}.{e}" for n in ("layer_differences", "attention_maps", "head_differences", "head_gallery")
        for e in ("png", "pdf")
    )
    for path in written:
        head = path.read_bytes()[:8]
        assert head.startswith(b"\x89PNG") if path.suffix == ".png" else head.startswith(b"%PDF")
