"""Whole-context maps through a single-cell run: binned over the model's context length, every backend equal to
the reference, each map row a distribution, kept per block like every sum."""

from __future__ import annotations

import numpy as np
import pytest

from attnprof.singlecell.run import profile_anndata

from helpers import demo_fixtures

adata, vocab, means, model = demo_fixtures(n_cells=60, n_genes=50, seed=7, context_length=40)


def run(model, adata, vocab, means, **kw):
    return profile_anndata(model, adata, "sex", vocab=vocab, means=means, progress=False, window=16,
                           replicate="animal", subset_by=["cell_type"], map_bins=8, **kw)  # fmt: skip


def test_a_runs_maps_equal_the_reference_and_their_rows_are_distributions(model, adata, vocab, means):
    fast, ref = run(model, adata, vocab, means, backend="torch"), run(model, adata, vocab, means, backend="reference")
    assert fast.map_length == model.context_length and fast.sums["map_sum"].shape[-2:] == (8, 8)
    for name in ("map_sum", "map_sq", "map_count"):
        np.testing.assert_allclose(fast.sums[name], ref.sums[name], rtol=1e-5, atol=1e-7, err_msg=name)
    # each cell's map row sums to 1, so a row of summed maps sums to the cells with a query in that bin (every
    # cell has a key in bin 0: its context tokens)
    rows = fast.sums["map_sum"].sum(-1)  # [layers, blocks, heads, query bins]
    cells = fast.sums["map_count"][..., 0][:, :, None, :]
    np.testing.assert_allclose(rows, np.broadcast_to(cells, rows.shape), rtol=1e-6)
    assert cells.max() > 0
    astro = fast.view(within={"cell_type": "astrocyte"})  # per block: any subset's maps
    alone = profile_anndata(model, adata, "sex", vocab=vocab, means=means, progress=False, window=16,
                            replicate="animal", subset="cell_type == 'astrocyte'", map_bins=8, backend="torch")  # fmt: skip
    np.testing.assert_allclose(astro.sums["map_sum"], alone.sums["map_sum"], rtol=1e-12, atol=1e-15)


def test_maps_need_bins_within_the_context(model, adata, vocab, means):
    with pytest.raises(ValueError, match="map"):
        profile_anndata(model, adata, "sex", vocab=vocab, means=means, progress=False, window=16,
                        map_bins=model.context_length + 1)  # fmt: skip
