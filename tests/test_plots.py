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
    return profile.compare("female", "male")


def test_attention_map_is_the_group_mean(comparison):
    p = comparison.profile
    m = attention_map(p, "male", layer=1, head=2)
    count = p.sums["pos_count"][1, 1]
    seen = count > 0
    np.testing.assert_allclose(m[seen], p.sums["pos_sum"][1, 1, 2][seen] / count[seen])
    assert np.isnan(m[~seen]).all()
    # the window (40) covers the whole context (40): each cell's context rows sum to 1
    np.testing.assert_allclose(p.sums["pos_sum"][1, 1, 2, :3].sum(-1), p.cells["male"], rtol=1e-5)
    with pytest.raises(ValueError, match="head 4 is out of range"):
        attention_map(p, "male", layer=0, head=4)


def test_head_matrix_and_strongest_head_follow_the_heads_table(comparison):
    heads = comparison.heads
    m = head_matrix(comparison, "gene", "max_abs_diff")
    assert m.shape == (2, 4)
    row = heads[(heads["family"] == "gene") & (heads["layer"] == 1) & (heads["head"] == 3)]
    assert m[1, 3] == row["max_abs_diff"].item()
    pos = heads[heads["family"] == "position"]
    best = pos.loc[pos["max_abs_diff"].idxmax()]
    assert strongest_head(comparison) == (best["layer"], best["head"])


def labels(ax):
    return ax.get_title(), ax.get_xlabel(), ax.get_ylabel()


def test_layer_difference_figure_reads_well(comparison):
    fig = plot_layer_differences(comparison)
    mean_ax, max_ax = fig.axes
    assert "mean over heads" in mean_ax.get_title() and "max over heads" in max_ax.get_title()
    assert mean_ax.get_xlabel() == "layer" and "female − male" in mean_ax.get_ylabel()
    legend = [t.get_text() for t in mean_ax.get_legend().get_texts()]
    assert legend == ["position maps (first 40 positions)", "attention received per gene", "panel gene pairs"]
    assert len(mean_ax.lines) == 3 and list(mean_ax.lines[1].get_ydata()) == list(comparison.layers.query(
        "family == 'gene'")["mean_abs_diff"])  # fmt: skip
    assert "female vs male" in fig._suptitle.get_text()


def test_attention_map_figure_reads_well(comparison):
    fig = plot_attention_maps(comparison.profile, layer=0, head=1, groups=["female", "male"])
    images = [ax for ax in fig.axes if ax.images]
    colorbars = [ax for ax in fig.axes if not ax.images]
    assert len(images) == 3 and len(colorbars) == 3
    assert [ax.get_title() for ax in images] == ["female (n = 30)", "male (n = 30)", "difference female − male"]
    assert all(ax.get_xlabel() == "key position" and ax.get_ylabel() == "query position" for ax in images)
    assert "mean attention probability" in colorbars[0].get_ylabel()
    shown = images[0].images[0].get_array().filled(np.nan)
    np.testing.assert_allclose(shown, attention_map(comparison.profile, "female", 0, 1))
    assert "layer 0" in fig._suptitle.get_text() and "head 1" in fig._suptitle.get_text()


def test_head_difference_figure_reads_well(comparison):
    fig = plot_head_differences(comparison)
    images = [ax for ax in fig.axes if ax.images]
    assert [labels(ax) for ax in images] == [
        ("mean |difference|", "head", "layer"),
        ("max |difference|", "head", "layer"),
    ]
    assert "attention received per gene" in fig._suptitle.get_text()
    np.testing.assert_allclose(images[1].images[0].get_array(), head_matrix(comparison, "gene", "max_abs_diff"))
    assert len(images[0].texts) == 8  # the values are printed on a small grid


def test_save_figures_writes_png_and_pdf(comparison, tmp_path):
    written = save_figures(comparison.profile, comparison, tmp_path, layer=1, head=0)
    assert sorted(p.name for p in written) == sorted(
        f"{n}.{e}" for n in ("layer_differences", "attention_maps", "head_differences") for e in ("png", "pdf")
    )
    for path in written:
        head = path.read_bytes()[:8]
        assert head.startswith(b"\x89PNG") if path.suffix == ".png" else head.startswith(b"%PDF")
