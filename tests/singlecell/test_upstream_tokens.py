"""Tokens equal Nicheformer's own, on both upstream paths, and numba's tie order.

Two kinds of evidence:

* ``UPSTREAM``: tokens made by running theislab/nicheformer's own code once
  during development (commit 485cadb) on the fixture below, pasted here. The
  data were aligned as the notebooks align them, ``ad.concat([model, data],
  join="outer")`` with a one-row float64 model AnnData (so the counts became
  float64, as with model.h5ad); then ``tokenize_data`` after the Xenium
  notebook's "Technology mean" cell (``notebook``; with scipy's csr / ndarray
  restored to what it was then, ``np.true_divide(X.todense(), means)``: today's
  scipy computes ``X * (1 / means)`` as coo, other rounding), or
  ``NicheformerDataset`` (``dataset``); then the
  model's ``on_after_batch_transfer`` + ``complete_masking``: context tokens
  prepended, cut to the context length, 0 -> 1. (Fed float32 counts instead,
  upstream gives other tokens for cell 2: precision decides some ties.)
* hypothesis: a dense restatement of upstream's steps in the test (float64
  ``sf_normalize``, the means of each path, ``np.argsort(-x)`` compiled by
  numba) against attnprof on random tie-heavy data; it needs numba (test extra).
"""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from attnprof.singlecell.nicheformer.argsort import numba_argsort
from attnprof.singlecell.nicheformer.tokenizer import tokenize_anndata

NAN = np.nan
# 40 vocabulary genes; means with NaN (5), zeros, negatives (as the published MERFISH file) and
# fractions that the notebook path rounds (2.5 -> 3, 0.4 -> 0 -> 1, 1.49 -> 1, 3.5 -> 4, -0.3 -> -0 -> 1)
MEANS = np.array([
    4.0, 2.5, 2.0, NAN, 4.0, 0.0, 3.0, 1.0, -2370.27, 3.0, 1.0, NAN, 2.0, 3.0, -3.6, 4.0, 1.0, 0.4, 3.0, NAN,
    1.0, 4.0, 0.0, 2.0, 3.0, 1.49, 4.0, NAN, 4.0, 4.0, -0.3, 4.0, 4.0, 3.5, 4.0, NAN, 2.0, 1.0, 2.0, 4.0,
])  # fmt: skip
COUNTS = np.array([
    # 30 genes at count 1: a tie far beyond 16
    [1, 1, 1, 2, 1, 1, 0, 2, 1, 1, 1, 1, 1, 1, 2, 1, 0, 1, 1, 1, 1, 0, 0, 1, 1, 2, 1, 1, 1, 1, 1, 0, 1, 0, 1, 1, 0, 1, 1, 1],
    [0] * 40,  # no counts
    # every gene expressed: more genes than the context holds
    [3, 3, 1, 3, 1, 2, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 2, 2, 1, 3, 1, 2, 3, 3, 3, 3, 3, 2, 3, 2, 3, 1, 2, 3, 2, 2, 2, 2, 2],
    [0, 0, 2, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0],
    [0, 1, 3, 4, 4, 0, 0, 4, 3, 4, 2, 2, 1, 4, 0, 1, 0, 2, 3, 2, 2, 0, 1, 1, 3, 1, 3, 2, 4, 3, 0, 3, 1, 2, 1, 2, 0, 2, 2, 1],
    # counts only in NaN-mean and negative-mean genes
    [0, 0, 0, 1, 0, 0, 0, 0, 2, 0, 0, 3, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
], dtype=np.float32)  # fmt: skip
CONTEXT = [5, 9, 4]  # human, Xenium, spatial
CONTEXT_LENGTH = 24  # 21 genes
UPSTREAM = {
    "notebook": [
        [5, 9, 4, 55, 33, 37, 50, 47, 65, 41, 40, 57, 67, 35, 60, 49, 42, 68, 53, 32, 54, 43, 39, 31],
        [5, 9, 4] + [1] * 21,
        [5, 9, 4, 55, 33, 50, 57, 46, 52, 67, 35, 65, 47, 40, 41, 60, 53, 42, 54, 37, 66, 68, 31, 49],
        [5, 9, 4, 32, 50, 39, 61] + [1] * 17,
        [5, 9, 4, 33, 37, 57, 65, 49, 67, 41, 47, 40, 50, 32, 39, 43, 48, 34, 52, 54, 55, 58, 68, 56],
        [5, 9, 4, 41, 33, 60, 38, 44] + [1] * 16,
    ],
    "dataset": [
        [5, 9, 4, 47, 37, 55, 67, 35, 50, 40, 53, 32, 68, 42, 31, 54, 39, 48, 43, 59, 58, 62, 56, 64],
        [5, 9, 4, 33, 41, 49, 57, 65] + [1] * 16,  # an empty cell still gets the NaN-mean genes
        [5, 9, 4, 47, 50, 46, 55, 52, 67, 35, 40, 53, 31, 54, 37, 66, 68, 42, 61, 30, 59, 56, 64, 43],
        [5, 9, 4, 32, 50, 39, 61, 33, 41, 49, 57, 65] + [1] * 12,
        [5, 9, 4, 47, 37, 50, 40, 67, 32, 43, 39, 34, 68, 48, 58, 52, 54, 56, 61, 59, 55, 63, 42, 53],
        [5, 9, 4, 38, 44, 60, 33, 41, 49, 57, 65] + [1] * 13,
    ],
}
VOCAB = [f"g{i}" for i in range(64)]


def shuffled_with_extra_gene(counts: np.ndarray, sparse: bool, seed: int = 1) -> ad.AnnData:
    """The data in another column order, plus a gene outside the vocabulary (left out before normalizing)."""
    perm = np.random.default_rng(seed).permutation(counts.shape[1])
    X = np.concatenate([counts[:, perm], np.full((len(counts), 1), 7, counts.dtype)], axis=1)
    var = pd.DataFrame(index=[VOCAB[i] for i in perm] + ["outside"])
    return ad.AnnData(X=sp.csr_matrix(X) if sparse else X, var=var)


def tokens(adata, means, tokenization, context_length=CONTEXT_LENGTH, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the gene outside the vocabulary
        return tokenize_anndata(
            adata, VOCAB[: len(means)], means, context_length=context_length, species="human", assay="Xenium",
            modality="spatial", tokenization=tokenization, chunk_size=4, **kw,
        )  # fmt: skip


@pytest.mark.parametrize("tokenization", ["notebook", "dataset"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_equal_to_tokens_made_by_upstream_code(tokenization, sparse):
    got = tokens(shuffled_with_extra_gene(COUNTS, sparse), MEANS, tokenization)
    np.testing.assert_array_equal(got, UPSTREAM[tokenization])


def test_the_fixture_exercises_what_it_claims():
    m = np.nan_to_num(MEANS)
    m = np.where(m == 0, 1, np.where((m % 1) >= 0.5, np.ceil(m), np.floor(m)))
    m += m == 0
    score = COUNTS[0] / m  # cell 0 on the notebook path (no rounding question: groups only)
    _, tie_sizes = np.unique(score[score > 0], return_counts=True)
    assert tie_sizes.max() >= 8 and (score > 0).sum() >= 16
    stable = np.argsort(-score, kind="stable")[: CONTEXT_LENGTH - 3] + 30  # ties in index order
    assert UPSTREAM["notebook"][0][3:] != stable.tolist()  # upstream's quicksort reorders them
    assert (COUNTS[2] > 0).sum() > CONTEXT_LENGTH - 3  # truncation


# ----------------------------------------------- upstream restated, numba's sort
numba = pytest.importorskip("numba", reason="the comparison with numba's argsort needs numba (pip install .[test])")


@numba.njit
def _numba_argsort(x):
    return np.argsort(x)


def upstream_restated(counts: np.ndarray, means: np.ndarray, tokenization: str, context_length: int) -> np.ndarray:
    """Upstream's steps on dense float32 counts aligned to the vocabulary (restated, not copied)."""
    m = means.copy()
    if tokenization == "notebook":
        m = np.nan_to_num(m)
        m = np.where(m == 0, 1, np.where((m % 1) >= 0.5, np.ceil(m), np.floor(m)))
    m += m == 0
    x = counts.astype(np.float64)  # float64 after the concat with model.h5ad
    # the notebooks sum scipy's sparse rows (tokenize_data gets adata.X, sparse after the concat);
    # NicheformerDataset sums dense rows (it calls .toarray() first)
    library = np.asarray(sp.csr_matrix(x).sum(axis=1)).ravel() if tokenization == "notebook" else x.sum(axis=1)
    library += library == 0
    x *= (10000.0 / library).reshape(-1, 1)
    x = x / m.reshape(1, -1)
    out = np.ones((len(x), context_length), dtype=np.int64)
    out[:, :3] = CONTEXT
    for i, cell in enumerate(x):
        nonzero = np.nonzero(cell)[0]
        ids = nonzero[_numba_argsort(-cell[nonzero])][: context_length - 3] + 30
        out[i, 3 : 3 + len(ids)] = ids
    return out


@st.composite
def tie_heavy(draw):
    n_genes = draw(st.integers(16, 60))
    n_cells = draw(st.integers(1, 5))
    top = draw(st.integers(1, 4))  # counts 0..top: ties everywhere
    counts = np.array(draw(st.lists(st.lists(st.integers(0, top), min_size=n_genes, max_size=n_genes),
                                    min_size=n_cells, max_size=n_cells)), dtype=np.float32)  # fmt: skip
    means = np.array(draw(st.lists(st.sampled_from([NAN, 0.0, 1.0, 2.0, 2.5, 0.4, -3.6, -0.3, 1e-3, 4.0]),
                                   min_size=n_genes, max_size=n_genes)))  # fmt: skip
    return counts, means, draw(st.integers(4, n_genes + 6))


@settings(max_examples=80, deadline=None)
@given(case=tie_heavy(), tokenization=st.sampled_from(["notebook", "dataset"]), sparse=st.booleans())
def test_equal_to_upstream_restated_on_tie_heavy_data(case, tokenization, sparse):
    counts, means, context_length = case
    expected = upstream_restated(counts, means, tokenization, context_length)
    got = tokens(shuffled_with_extra_gene(counts, sparse), means, tokenization, context_length=context_length)
    np.testing.assert_array_equal(got, expected)


@settings(max_examples=40, deadline=None)
@given(case=tie_heavy(), tokenization=st.sampled_from(["notebook", "dataset"]), seed=st.integers(0, 2**16))
def test_equal_to_upstream_restated_on_non_integer_values(case, tokenization, seed):
    # e.g. volume-normalized data: library sums are no longer exact, so the summation order must be upstream's
    counts, means, context_length = case
    counts = counts * np.random.default_rng(seed).uniform(0.1, 3.0, counts.shape).astype(np.float32)
    expected = upstream_restated(counts, means, tokenization, context_length)
    got = tokens(shuffled_with_extra_gene(counts, True), means, tokenization, context_length=context_length)
    np.testing.assert_array_equal(got, expected)


def test_same_tokens_without_numba(monkeypatch):
    import attnprof.singlecell.nicheformer.argsort as argsort

    monkeypatch.setitem(__import__("sys").modules, "numba", None)  # `import numba` now fails
    monkeypatch.setattr(argsort, "_SORTS", {})
    for tokenization in ("notebook", "dataset"):
        got = tokens(shuffled_with_extra_gene(COUNTS, True), MEANS, tokenization)
        np.testing.assert_array_equal(got, UPSTREAM[tokenization])
    assert list(argsort._SORTS) == [False]  # the plain Python sort ran


@settings(max_examples=300, deadline=None)
@given(
    keys=st.lists(st.sampled_from([0.0, 1.0, 2.0, -1.0, 0.5, NAN, np.inf]), min_size=0, max_size=120)
    | st.lists(st.floats(allow_nan=True, width=32), max_size=60),
    compiled=st.booleans(),
)
def test_argsort_equals_numbas(keys, compiled):
    keys = np.array(keys, dtype=np.float64)
    np.testing.assert_array_equal(numba_argsort(keys, compiled=compiled), _numba_argsort(keys))


def test_forty_way_tie_equals_upstream_restated():
    counts = np.ones((2, 40), dtype=np.float32)
    counts[1, ::3] = 2
    for tokenization in ("notebook", "dataset"):
        expected = upstream_restated(counts, np.ones(40), tokenization, 30)
        got = tokens(shuffled_with_extra_gene(counts, True), np.ones(40), tokenization, 30)
        np.testing.assert_array_equal(got, expected)


def test_argsort_is_not_index_order_on_large_ties():
    keys = -np.array([1.0] * 20 + [2.0] * 5)
    assert numba_argsort(keys).tolist() != sorted(range(25), key=lambda i: keys[i])
