"""A run keeps gene sums only for the token ids its data can hold (the data's genes in the vocabulary, the
context tokens, the panel): the same tables as with every vocabulary id, in less memory."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from attnprof import merge
from attnprof.singlecell.run import profile_anndata
from attnprof.singlecell.vocab import GENE_OFFSET

from helpers import demo_fixtures

adata, vocab, means, model = demo_fixtures(n_cells=90, n_genes=60, seed=5, context_length=64)


def run(model, adata, vocab, means, **kw):
    return profile_anndata(model, adata, "sex", vocab=vocab, means=means, progress=False, backend="torch",
                           replicate="animal", **kw)  # fmt: skip


def test_the_gene_axis_holds_the_datas_genes_and_the_tables_equal_those_of_every_id(model, adata, vocab, means):
    unmeasured = [g for g in vocab.genes if g not in set(adata.var_names)]
    assert unmeasured, "the fixture's vocabulary must hold genes the data lacks"
    panel = [unmeasured[0], adata.var_names[0]]
    compact = run(model, adata, vocab, means, panel=panel)
    full = run(model, adata, vocab, means, panel=panel, all_genes=True)
    assert len(full.genes) == vocab.n_tokens + 5 and len(compact.genes) < len(full.genes)
    data_genes = set(adata.var_names) & set(vocab.genes)
    assert set(compact.genes) == {full.genes[i] for i in range(GENE_OFFSET)} | data_genes | {unmeasured[0]}
    ids = np.asarray(compact.meta["token_ids"])
    assert [full.genes[i] for i in ids] == compact.genes  # each kept gene's model token id
    kw = dict(min_cells=2, permutations=20, seed=3)
    a, b = compact.compare("female", "male", **kw), full.compare("female", "male", **kw)
    for name, table in b.tables().items():  # equal up to the order of summation over the gene axis
        pd.testing.assert_frame_equal(a.tables()[name], table, check_exact=False, rtol=1e-12, atol=0, obj=name)
    assert compact.meta["special_tokens"] == [i for i, g in enumerate(compact.genes) if full.genes.index(g) in
                                              full.meta["special_tokens"]]  # fmt: skip


def test_profiles_of_other_gene_panels_merge_only_with_every_id(model, adata, vocab, means):
    halves = [adata[:, :40].copy(), adata[:, 20:].copy()]
    cells = [np.arange(adata.n_obs) % 2 == i for i in range(2)]
    parts = [run(model, h[c].copy(), vocab, means) for h, c in zip(halves, cells)]
    with pytest.raises(ValueError, match="genes"):
        merge(parts)
    whole = merge([run(model, h[c].copy(), vocab, means, all_genes=True) for h, c in zip(halves, cells)])
    assert whole.cells == {"female": int(sum((adata.obs["sex"] == "female")[c].sum() for c in cells)),
                           "male": int(sum((adata.obs["sex"] == "male")[c].sum() for c in cells))}  # fmt: skip
