"""What the count matrix holds: log1p of normalized counts is inverted, the rest is tokenized or refused."""

from __future__ import annotations

import re
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from attnprof.singlecell.nicheformer.counts import log1p_tolerance
from attnprof.singlecell.nicheformer.tokenizer import tokenize_anndata

N_CELLS, N_GENES = 120, 500
GENES = [f"g{i}" for i in range(N_GENES)]


def raw_counts(seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    size = rng.uniform(0.2, 3.0, (N_CELLS, 1))  # libraries vary 15-fold
    return rng.poisson(size * rng.gamma(0.5, 2.0, N_GENES)).astype(np.float32)


def log1p_normalized(counts: np.ndarray, target=1e4) -> np.ndarray:
    """scanpy's normalize_total (counts / (library / target), float32) then log1p, restated."""
    library = counts.sum(1, keepdims=True)
    return np.log1p(counts / np.where(library == 0, 1, library / np.float32(target)))


def anndata(X, sparse=True, **uns) -> ad.AnnData:
    return ad.AnnData(X=sp.csr_matrix(X) if sparse else X, var=pd.DataFrame(index=GENES), uns=uns)


def tokens(adata, **kw):
    return tokenize_anndata(adata, GENES, context_length=400, chunk_size=50, **kw)


@pytest.mark.parametrize("target", [1e4, 1e6])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_log1p_of_normalized_counts_is_inverted(target, sparse):
    counts = raw_counts()
    with pytest.warns(UserWarning, match=re.escape(f"sums to {target:.6g}: they are log1p of normalized counts")):
        got = tokens(anndata(log1p_normalized(counts, target), sparse, log1p={"base": None}))
    # equal counts stay equal through normalize/log1p/expm1 and distinct ones stay far apart,
    # so with all means 1 the tokens are those of the raw counts
    np.testing.assert_array_equal(got, tokens(anndata(counts)))


def test_log1p_of_unnormalized_counts_is_refused_when_marked_as_log1p():
    logged = np.log1p(raw_counts())
    with pytest.raises(ValueError, match=r"log1p-transformed \(adata.uns\['log1p'\].*cannot be recovered.*--layer"):
        tokens(anndata(logged, log1p={"base": None}))


def test_genes_subset_after_normalizing_is_refused():
    logged = log1p_normalized(raw_counts())[:, :300]  # e.g. highly variable genes kept after log1p
    adata = ad.AnnData(X=sp.csr_matrix(logged), var=pd.DataFrame(index=GENES[:300]), uns={"log1p": {}})
    with pytest.raises(ValueError, match="does not sum to one constant per cell"):
        tokens(adata)


def test_other_non_integer_values_are_tokenized_as_given_with_a_warning():
    # e.g. volume-normalized MERFISH: upstream tokenizes these values as they are
    volume = np.random.default_rng(1).uniform(0.5, 2.0, (N_CELLS, 1)).astype(np.float32)
    values = raw_counts() / volume
    with pytest.warns(UserWarning, match="non-integer values and is tokenized as it is"):
        got = tokens(anndata(values))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # integer counts: no warning at all
        np.testing.assert_array_equal(got, tokens(anndata(raw_counts())))  # one scale per cell: same ranks


def test_tolerance_covers_float32_rounding_and_rejects_real_library_spread():
    counts = raw_counts(seed=3)
    logged = log1p_normalized(counts)
    sums = np.expm1(logged.astype(np.float64)).sum(1)
    sums = sums[counts.sum(1) > 0]
    tol = log1p_tolerance(np.float32, float(logged.max()), N_GENES)
    assert 1e-7 < tol < 1e-4  # a few float32 ulps, far below any real spread of libraries
    assert sums.max() - sums.min() <= tol * sums.max()
    raw = counts.sum(1)[counts.sum(1) > 0]
    assert raw.max() - raw.min() > 100 * tol * raw.max()


def test_large_non_integer_values_are_not_taken_for_log1p():
    # expm1 of values above ~709 overflows to inf: cells with finite and infinite sums must not look constant
    values = raw_counts() * np.float32(0.37)
    values[: N_CELLS // 2] += np.float32(800.25) * (values[: N_CELLS // 2] > 0)
    with pytest.warns(UserWarning, match="tokenized as it is"):
        tokens(anndata(values))
