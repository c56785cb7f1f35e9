"""Tests that kill the mutants mutmut left alive in profiler/singlecell/nicheformer/tokenizer.py
(``scripts/mutation.sh tokenize``): defaults, where the counts come from, exact messages, the caller's data
left untouched, row checks, and what a tokenizer's settings record. Public functions only.

Mutants left alive on purpose, because they are equivalent:

- ``_check_counts``: ``min() < 0`` -> ``<= 0``: the matrix has had its zeros eliminated, so no entry is 0.
- ``np.asarray(..., dtype=np.int64)`` -> default dtype for Python ints and row positions: int64 on the 64-bit
  platforms torch supports.
- ``tokenize_anndata``: ``count_matrix(adata, layer, use_raw)`` -> ``use_raw=None`` only sizes the output;
  ``.raw`` has the cells of ``X`` (anndata enforces it), so the size is the same.
- ``library += library == 0`` -> ``-=`` or ``== 1``: a cell's library only scales all its values alike (a
  cell with library 0 has no value to rank), so the ranking within a cell stays, up to rounding of ties.
- ``_numba_order``'s pure-Python fallback runs only without numba; ``tests/test_upstream_tokens.py``
  (``test_same_tokens_without_numba``) drives it, the rest of the run uses the compiled sort.
- ``dtype=np.int64`` dropped from ``np.full(..., PAD)`` / ``np.array`` of context ids (``Tokenizer.__init__``,
  ``tokenize_rows``, ``tokenize_anndata``) or from ``align_genes``' arrays: numpy's default int, int64 as above.
- context defaults ``"MOUSE"``, ``"merfish"``, ``"SPATIAL"``: ``context_id`` looks names up case-insensitively.
- ``chunk_size`` default 1024 -> 1025, or not passed on by ``tokenize_anndata``: chunks change memory, never tokens.
- ``_library``'s rows per dense block (``max(2, ...)``, ``2 * 21``, ``3**21``, ``2**22``, no ``range`` step): every
  row is still summed whole within one block (overlapping blocks rewrite the same sums).
- ``_library``: ``bincount`` without ``minlength`` only shortens the totals past the last counted cell (never
  indexed); the CSR ``shape`` left out is inferred as the same ``(n, n_vocab or less)`` from ``indptr``; ``sum`` of a
  float64 matrix is float64 without ``dtype``; ``max(initial=1)``: all totals are >= 0, 1 < 2**53 like 0;
  ``np.all(None)`` and ``< 2.0 * 53`` only send integer totals below 2**53 to the other summation, exact too.
- ``_as_csr`` ``or True``: a dense array through ``csr_matrix(..., copy=True)`` is the same matrix.
- ``_numba_order``: ``tie = None``, ``&`` -> ``|``, ``isnan | isnan``: more cells go through the quicksort, which
  for untied cells gives the stable sort's only order; ``> SMALL_QUICKSORT`` -> ``>=``: a cell of 15 keys runs
  numba's stable insertion sort inside the quicksort too.
- ``align_genes`` ``stacklevel`` 2 -> 3 or dropped: asserted outside mutmut only (its trampoline adds a frame).

Left alive and NOT shown equivalent (a killing test needs a cell where the last bit of its library flips a near
tie): which order sums a non-integer cell's library (``_library`` ``and`` -> ``or``, ``counts != round``,
``<= 2.0**53``, ``3.0**53``, ``2.0**54``, ``if dense``; ``tokenize_rows``' ``dense=`` mutants; ``_as_csr`` keeping a
dense float32 chunk's dtype), and a dense block's library scaled, not wrong in order (``row > lo``,
``sum(axis=None)``). ``max(initial=None)`` (``_library``, ``tokenize_rows``) differs only for a chunk of 0 rows, which crashed the
compiled sort (fixed; ``test_a_chunk_without_rows_gives_no_tokens`` now kills them).
"""

from __future__ import annotations

import os
import re
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from attnprof.singlecell.nicheformer.tokenizer import Tokenizer, align_genes, count_matrix, iter_token_chunks, tokenize_anndata
from attnprof.singlecell.nicheformer.technologies import TOKENIZATIONS
from attnprof.singlecell.vocab import PAD, Vocabulary, context_id

GENES = [f"g{i}" for i in range(6)]


def data(X=None, **kw):
    X = np.array([[0, 3, 1, 0, 2, 5], [4, 0, 0, 1, 1, 0], [1, 1, 1, 1, 1, 1]], dtype=np.float64) if X is None else X
    return ad.AnnData(X=X, var=pd.DataFrame(index=GENES), **kw)


def exactly(message: str) -> str:
    return "^" + re.escape(message) + "$"


def test_counts_come_from_x_by_default_and_every_source_error_is_exact():
    adata = data()
    adata.raw = data(X=np.ones((3, 6)))
    assert count_matrix(adata)[0] is adata.X  # not .raw unless asked
    adata.layers["counts"] = adata.X.copy()
    with pytest.raises(ValueError, match=exactly(
            "choose one source of counts: use_raw=True (--use-raw) or layer= (--layer), not both")):  # fmt: skip
        count_matrix(adata, "counts", True)
    with pytest.raises(ValueError, match=exactly(
            "use_raw was asked but this AnnData has no .raw: drop --use-raw or pick --layer")):  # fmt: skip
        count_matrix(data(), use_raw=True)
    with pytest.raises(ValueError, match=exactly("this AnnData has no layer 'spliced'; its layers are: none")):
        count_matrix(data(), "spliced")
    empty_x = ad.AnnData(X=None, obs=pd.DataFrame(index=["c0", "c1", "c2"]), var=pd.DataFrame(index=GENES),
                         layers={"counts": data().X})  # fmt: skip
    with pytest.raises(ValueError, match=exactly(
            "this AnnData has no X; pick the counts with layer= (--layer), layers: ['counts']")):  # fmt: skip
        count_matrix(empty_x)
    # no X at all: tokenize_anndata reads the layer for everything, including the number of cells
    tokens = tokenize_anndata(empty_x, GENES, layer="counts", context_length=9)
    np.testing.assert_array_equal(tokens, tokenize_anndata(data(), GENES, context_length=9))


def test_gene_alignment_messages_and_counts():
    with pytest.raises(ValueError, match=re.escape(
            "the data names 6 genes more than once (e.g. ['a', 'a', 'b', 'c', 'd']): make them unique")):  # fmt: skip
        align_genes(["a", "a", "a", "b", "b", "c", "c", "d", "d", "e", "e"], ["a"])
    with pytest.raises(ValueError, match=re.escape(
            "none of the data's 7 genes (e.g. ['x0', 'x1', 'x2', 'x3', 'x4']) is in the vocabulary of 6 genes "
            "(e.g. ['g0', 'g1', 'g2', 'g3', 'g4']) from ")):  # fmt: skip
        align_genes([f"x{i}" for i in range(7)], GENES)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        alignment = align_genes(["x0", "g2", "x1", "g0", "x2", "x3", "x4", "x5"], GENES)
    assert len(caught) == 1 and str(caught[0].message) == (
        "6 of the data's 8 genes are not in the vocabulary and are dropped (2 are tokenized); "
        "e.g. ['x0', 'x1', 'x2', 'x3', 'x4']"
    )
    if "MUTANT_UNDER_TEST" not in os.environ:  # mutmut's trampoline adds a frame between caller and callee
        assert caught[0].filename == __file__  # stacklevel: the warning points at the caller
    assert alignment.n_data_genes == 8
    assert alignment.columns.tolist() == [1, 3] and alignment.vocab_index.tolist() == [2, 0]
    assert alignment.columns.dtype == np.int64 and alignment.vocab_index.dtype == np.int64


def test_tokenizer_defaults_settings_and_limits():
    tok = Tokenizer(GENES)
    expected_context = [context_id("species", "mouse"), context_id("assay", "MERFISH"),
                        context_id("modality", "spatial")]  # fmt: skip
    assert tok.settings() == {
        "vocabulary": Vocabulary(GENES).digest(),
        "n_genes": 6,
        "means": tok.settings()["means"],
        "tokenization": "notebook",
        "context": expected_context,
        "context_length": 1500,
    }
    assert tok.context.dtype == np.int64 and isinstance(tok.context_length, int)
    other = Tokenizer(GENES, np.full(6, 2.0), tokenization="dataset")
    assert other.settings()["means"] != tok.settings()["means"] and other.settings()["tokenization"] == "dataset"
    np.testing.assert_array_equal(other.raw_means, np.full(6, 2.0))
    with pytest.raises(ValueError, match=exactly(f"unknown tokenization 'paper'; choose one of: {', '.join(TOKENIZATIONS)}")):
        Tokenizer(GENES, tokenization="paper")
    with pytest.raises(ValueError, match=exactly("context_length must exceed the 3 context tokens, got 3")):
        Tokenizer(GENES, context_length=3)
    assert Tokenizer(GENES, context_length=4).context_length == 4
    # NaN means (the dataset path ranks NaN in every cell): listed, and only those
    nan = Tokenizer(GENES, np.array([1.0, np.nan, 1.0, 1.0, np.nan, 1.0]), tokenization="dataset")
    assert nan.nan_genes.tolist() == [1, 4]


def test_tokenize_anndata_defaults_and_context_tokens():
    tokens = tokenize_anndata(data(), GENES)
    assert tokens.shape == (3, 1500) and tokens.dtype == np.int64
    assert tokens[:, :3].tolist() == [[context_id("species", "mouse"), context_id("assay", "MERFISH"),
                                       context_id("modality", "spatial")]] * 3  # fmt: skip
    human = tokenize_anndata(data(), GENES, species="human", assay="Xenium", modality="dissociated",
                             context_length=8)  # fmt: skip
    assert human[0, :3].tolist() == [context_id("species", "human"), context_id("assay", "Xenium"),
                                     context_id("modality", "dissociated")]  # fmt: skip
    dataset = tokenize_anndata(data(), GENES, np.array([1, np.nan, 1, 1, 1, 1.0]), tokenization="dataset",
                               context_length=10)  # fmt: skip
    notebook = tokenize_anndata(data(), GENES, np.array([1, np.nan, 1, 1, 1, 1.0]), context_length=10)
    assert not np.array_equal(dataset, notebook)  # the tokenization reaches the tokenizer


def test_the_callers_matrix_is_left_as_it_was():
    X = sp.csr_matrix((np.array([2.0, 0.0, 1.0, 3.0]), np.array([1, 2, 1, 0]), np.array([0, 3, 4, 4])), shape=(3, 6))
    before = (X.data.copy(), X.indices.copy(), X.indptr.copy())  # a duplicate entry and an explicit zero
    ints = np.array([[0, 3, 1, 0, 2, 5]], dtype=np.int32)
    tok = Tokenizer(GENES, context_length=9)
    alignment = align_genes(GENES, GENES)
    tokens, lengths = tok.tokenize_rows(X, alignment)
    for now, then in zip((X.data, X.indices, X.indptr), before):
        np.testing.assert_array_equal(now, then)
    assert lengths.tolist() == [4, 4, 3] and tokens[0, 3] == 1 + 30  # g1 holds 2 + 1 = 3 counts in row 0
    tokens_int, _ = tok.tokenize_rows(ints, alignment)
    tokens_float, _ = tok.tokenize_rows(ints.astype(np.float64), alignment)
    np.testing.assert_array_equal(tokens_int, tokens_float)


def test_rows_must_be_sorted_unique_and_in_range_and_chunks_say_their_lengths():
    adata = data()
    tok = Tokenizer(GENES, context_length=9)
    message = exactly("rows must be sorted, unique positions in [0, 3)")
    for rows in ([1, 0], [1, 1], [-1, 2], [0, 3]):
        with pytest.raises(ValueError, match=message):
            next(iter_token_chunks(adata, tok, rows=np.array(rows)))
    chunks = list(iter_token_chunks(adata, tok, rows=[0, 2], chunk_size=1))
    assert [c.rows.tolist() for c in chunks] == [[0], [2]]
    for chunk in chunks:
        np.testing.assert_array_equal(chunk.lengths, (chunk.tokens != PAD).sum(1))
    assert [len(c) for c in chunks] == [1, 1]


def test_dataset_library_sums_each_cell_in_blocks_of_rows():
    # 2**20 vocabulary genes: the dataset path sums 2**21 // 2**20 = 2 dense rows at a time, so 5 cells
    # span three blocks ([0, 2), [2, 4), [4, 5)); non-integer counts take that path (not the exact bincount)
    vocab = [f"v{i}" for i in range(2**20 - 6)] + GENES
    X = np.array([[0.5, 3.25, 1.5, 0, 2.75, 0], [4.5, 0, 0, 1.25, 0, 0], [0, 0, 0, 0, 0, 0.5],
                  [2.5, 0, 0.75, 0, 0, 0], [0, 1.5, 0, 0, 0, 0.25]])  # fmt: skip
    tokens, lengths = Tokenizer(vocab, tokenization="dataset", context_length=9).tokenize_rows(
        X, align_genes(GENES, vocab))  # fmt: skip
    g = {name: 2**20 - 6 + i + 30 for i, name in enumerate(GENES)}  # GENE_OFFSET: 30 special tokens first
    # each cell's genes by count, largest first (means all 1: the library only scales a cell)
    expected = [[g["g1"], g["g4"], g["g2"], g["g0"]], [g["g0"], g["g3"], PAD, PAD], [g["g5"], PAD, PAD, PAD],
                [g["g0"], g["g2"], PAD, PAD], [g["g1"], g["g5"], PAD, PAD]]  # fmt: skip
    assert tokens[:, 3:].tolist() == expected and lengths.tolist() == [7, 5, 4, 5, 5]



def test_a_value_of_exactly_one_is_ranked_and_bad_counts_are_refused_with_exact_messages():
    tok = Tokenizer(GENES, context_length=9)
    alignment = align_genes(GENES, GENES)
    # 1 of 10000 counts normalizes to exactly 1.0 (mean 1): still expressed, so still a token
    tokens, lengths = tok.tokenize_rows(np.array([[1.0, 9999.0, 0, 0, 0, 0]]), alignment)
    assert tokens[0, 3:].tolist() == [31, 30] and lengths.tolist() == [5]
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError, match=exactly(
                "the counts hold NaN or Inf values: repair the data (e.g. np.nan_to_num) first")):  # fmt: skip
            tok.tokenize_rows(np.array([[1.0, bad, 0, 0, 0, 0]]), alignment)
    with pytest.raises(ValueError, match=exactly(
            "the count matrix has negative values (min -2.5): tokenization needs raw counts; "
            "pick them with layer= (--layer) or use_raw=True (--use-raw)")):  # fmt: skip
        tok.tokenize_rows(np.array([[1.0, -2.5, 0, 0, 0, 0]]), alignment)


def test_settings_record_an_eight_byte_means_digest():
    import hashlib

    # shards written earlier must keep merging: the recorded digest's format is part of the contract
    expected = hashlib.blake2b(np.ones(6).tobytes(), digest_size=8).hexdigest()
    assert Tokenizer(GENES).settings()["means"] == expected and len(expected) == 16


def test_sparse_small_integer_counts_are_summed_as_float64():
    # a uint8 matrix with a duplicate entry: 200 + 100 = 300 counts of g0 (uint8 would wrap to 44 < 250)
    X = sp.csr_matrix((np.array([200, 100, 250], np.uint8), np.array([0, 0, 1]), np.array([0, 3])), shape=(1, 6))
    tokens, _ = Tokenizer(GENES, context_length=5).tokenize_rows(X, align_genes(GENES, GENES))
    assert tokens[0, 3:].tolist() == [30, 31]


def test_row_positions_come_back_as_int64():
    chunks = list(iter_token_chunks(data(), Tokenizer(GENES, context_length=9), rows=np.array([0, 2], np.int32)))
    assert [c.rows.dtype for c in chunks] == [np.dtype(np.int64)] and chunks[0].rows.tolist() == [0, 2]


def test_log1p_data_is_tokenized_from_its_expm1():
    # normalized cells (each sums to 10000), stored as log1p; with means [1, 2, ...] the ranking of the
    # normalized values (2000 vs 8000 / 2) differs from that of their logs (7.6 vs 9.0 / 2)
    normalized = np.array([[2000.0, 8000.0, 0, 0, 0, 0], [5000.0, 5000.0, 0, 0, 0, 0]])
    means = np.array([1.0, 2.0, 1, 1, 1, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the note that expm1 of the data is tokenized
        tokens = tokenize_anndata(data(np.log1p(normalized)), GENES, means, context_length=5)
    assert tokens[:, 3:].tolist() == [[31, 30], [30, 31]]


def test_without_numba_tied_cells_still_go_through_the_quicksort(monkeypatch):
    # cells of more than 15 ranked genes whose keys tie (all equal; or only NaN-mean genes on the dataset
    # path) have numba's quicksort order, not index order; the pure-Python fallback must find those ties
    import sys

    import attnprof.singlecell.nicheformer.argsort as argsort

    genes = [f"h{i}" for i in range(40)]
    alignment = align_genes(genes, genes)
    equal = np.ones((1, 40))
    nan_means = np.where(np.arange(40) % 2 == 0, np.nan, 1.0)
    distinct = np.where(np.arange(40) % 2 == 1, np.arange(40.0), 0.0)[None]
    cases = [(Tokenizer(genes, context_length=50), equal),
             (Tokenizer(genes, nan_means, tokenization="dataset", context_length=50), distinct)]  # fmt: skip
    compiled = [tok.tokenize_rows(X, alignment)[0] for tok, X in cases]
    monkeypatch.setitem(sys.modules, "numba", None)  # `import numba` now fails
    monkeypatch.setattr(argsort, "_SORTS", {})
    for (tok, X), expected in zip(cases, compiled):
        tokens = tok.tokenize_rows(X, alignment)[0]
        np.testing.assert_array_equal(tokens, expected)
        assert not np.array_equal(np.sort(tokens[0, 3:]), tokens[0, 3:])  # not index order: the tie matters
    assert list(argsort._SORTS) == [False]  # the plain Python sort ran


def test_a_chunk_without_rows_gives_no_tokens():
    """Once a segfault: numba's sort read one segment past the end when a chunk had no cells."""
    tokens, lengths = Tokenizer(GENES).tokenize_rows(sp.csr_matrix((0, len(GENES))), align_genes(GENES, GENES))
    assert tokens.shape == (0, 3) and tokens.dtype == np.int64 and lengths.shape == (0,)
