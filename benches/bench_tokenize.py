"""Tokenization of a MERFISH-like panel: attnprof's tokenizer against upstream's numba loop.

500 genes, Poisson counts (ties in nearly every cell, so nearly every cell
goes through the quicksort of numba's order), rounded means. Contenders, on
the same cells: upstream's steps (dense ``sf_normalize`` and a numba-jitted
per-cell ``np.argsort``, restated; the baseline), attnprof with its sort
compiled by numba, attnprof with the plain Python sort (no numba installed).
Quick mode: 2,000 cells; ``--full``: 20,000.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import scipy.sparse as sp

from attnprof.singlecell.nicheformer import argsort
from attnprof.singlecell.nicheformer import tokenizer as tokenize
from attnprof.singlecell.nicheformer.tokenizer import Tokenizer, align_genes

numba = pytest.importorskip("numba")
N_GENES = 500


@pytest.fixture(scope="module")
def cells(full):
    rng = np.random.default_rng(0)
    n = 20_000 if full else 2_000
    counts = rng.poisson(rng.gamma(0.4, 2.0, N_GENES), (n, N_GENES)).astype(np.float32)
    means = np.round(rng.gamma(2.0, 1.0, N_GENES))
    vocab = [f"g{i}" for i in range(N_GENES)]
    tok = Tokenizer(vocab, means, context_length=1500)
    return counts, tok, align_genes(vocab, tok.vocab)


@numba.njit(nogil=True)
def _upstream_loop(x, max_len):
    out = np.zeros((x.shape[0], max_len), dtype=np.int32)
    for i in range(x.shape[0]):
        cell = x[i]
        nonzero = np.nonzero(cell)[0]
        ids = nonzero[np.argsort(-cell[nonzero])][:max_len] + 30
        out[i, : len(ids)] = ids
    return out


def upstream(counts, means):
    x = counts.astype(np.float64)  # float64 after the concat with model.h5ad
    library = x.sum(axis=1)
    library += library == 0
    x *= (10000.0 / library).reshape(-1, 1)
    return _upstream_loop(x / means.reshape(1, -1), 1497)


def _info(benchmark, n, contender, baseline=False):
    benchmark.group = f"tokenize {n} cells x {N_GENES} genes"
    benchmark.extra_info.update(contender=contender, baseline=baseline)


def test_upstream_numba(benchmark, cells):
    counts, tok, _ = cells
    _info(benchmark, len(counts), "upstream steps, numba loop", baseline=True)
    upstream(counts[:10], tok.means)  # compile outside the timing
    benchmark.pedantic(upstream, (counts, tok.means), rounds=3, iterations=1)


def test_attnprof_compiled_sort(benchmark, cells):
    counts, tok, alignment = cells
    _info(benchmark, len(counts), "attnprof, sort compiled by numba")
    block = sp.csr_matrix(counts)
    tok.tokenize_rows(block[:10], alignment)  # compile outside the timing
    tokens, _ = benchmark.pedantic(tok.tokenize_rows, (block, alignment), rounds=3, iterations=1)
    expected = upstream(counts, tok.means)[:, : tokens.shape[1] - 3]
    np.testing.assert_array_equal(tokens[:, 3:], np.where(expected == 0, 1, expected))  # padding 0 -> 1


def test_attnprof_python_sort(benchmark, cells, monkeypatch):
    counts, tok, alignment = cells
    _info(benchmark, len(counts), "attnprof, plain Python sort (no numba)")
    monkeypatch.setattr(tokenize, "compiled_available", lambda: False)  # as without numba installed
    monkeypatch.setattr(tokenize, "argsort_segments", functools.partial(argsort.argsort_segments, compiled=False))
    benchmark.pedantic(tok.tokenize_rows, (sp.csr_matrix(counts), alignment), rounds=1, iterations=1)
