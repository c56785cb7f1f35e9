"""Family tokenizers on a transcriptome-scale chunk: cells/s, and the non-zero path against a dense chunk.

Full mode: 2,000 cells x 20,000 genes, 10 % non-zero (about 2,000 detected genes per cell, raw counts);
quick mode: 200 x 2,000. Contenders, Geneformer group:

- dense chunk (baseline): Geneformer's own form, the whole chunk densified, ``X / n_counts * 10_000 /
  medians``, ``csr_matrix``, ``argsort`` per cell (what ``TranscriptomeTokenizer`` does);
- attnprof: the same arithmetic on the non-zero entries only (identical tokens, tests/test_geneformer.py).

scGPT group: both preprocessing paths of attnprof (``embed`` bins non-zero entries, ``tutorial`` normalizes
dense rows as scanpy does).
"""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from attnprof.singlecell.family import iter_family_chunks
from attnprof.singlecell.geneformer import GeneformerFrontEnd, GeneformerTokenizer
from attnprof.singlecell.scgpt import scgpt_front_end


@pytest.fixture(scope="module")
def data(full):
    n_cells, n_genes = (2000, 20_000) if full else (200, 2000)
    rng = np.random.default_rng(0)
    X = sp.random(n_cells, n_genes, density=0.1, format="csr", random_state=0,
                  data_rvs=lambda k: rng.integers(1, 20, k)).astype(np.float32)  # fmt: skip
    genes = [f"ENSG{i:05d}" for i in range(n_genes)]
    adata = ad.AnnData(X, var=pd.DataFrame(index=genes))
    adata.obs["n_counts"] = np.asarray(X.sum(1)).ravel().astype(np.float64)
    tokens = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3, **{g: i + 4 for i, g in enumerate(genes)}}
    medians = {g: 1.0 + (i % 7) for i, g in enumerate(genes)}
    vocab = {g: i for i, g in enumerate(genes)}
    vocab.update({"<pad>": n_genes, "<cls>": n_genes + 1, "<eoc>": n_genes + 2})
    return adata, tokens, medians, vocab


def dense_chunk(adata, tokens, medians):
    """Geneformer's form: the chunk densified, then its expression and ranking, cell by cell."""
    genes = list(adata.var_names)
    norm = np.array([medians[g] for g in genes])
    ids = np.array([tokens[g] for g in genes])
    X_norm = sp.csr_matrix(adata.X.toarray() / adata.obs["n_counts"].values[:, None] * 10_000 / norm)
    return [ids[X_norm[i].indices][np.argsort(-X_norm[i].data)][:4094] for i in range(X_norm.shape[0])]


def tokenize_all(adata, front):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sum(len(c) for c in iter_family_chunks(adata, front, rows=np.arange(adata.n_obs)))


def _bench(benchmark, group, name, fn, n_cells, baseline=False):
    benchmark.group = group
    benchmark.pedantic(fn, rounds=3, iterations=1)
    benchmark.extra_info.update(contender=name, cells=n_cells, baseline=baseline,
                                cells_per_s=round(n_cells / benchmark.stats.stats.min, 1))  # fmt: skip


@pytest.mark.parametrize("name", ["dense chunk (Geneformer's form)", "attnprof non-zero entries"])
def test_geneformer_tokenizer(benchmark, data, name):
    adata, tokens, medians, _ = data
    if name.startswith("dense"):
        fn = lambda: dense_chunk(adata, tokens, medians)  # noqa: E731
    else:
        front = GeneformerFrontEnd(GeneformerTokenizer(tokens, medians), len(tokens))
        fn = lambda: tokenize_all(adata, front)  # noqa: E731
    _bench(benchmark, "tokenize Geneformer", name, fn, adata.n_obs, baseline=name.startswith("dense"))


@pytest.mark.parametrize("mode", ["embed", "tutorial"])
def test_scgpt_tokenizer(benchmark, data, mode):
    adata, _, _, vocab = data
    front = scgpt_front_end(vocab, {}, mode=mode, max_length=adata.n_vars + 1)
    _bench(benchmark, "tokenize scGPT", f"attnprof {mode}", lambda: tokenize_all(adata, front), adata.n_obs,
           baseline=mode == "embed")  # fmt: skip
