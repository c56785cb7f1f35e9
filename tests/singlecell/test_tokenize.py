"""Nicheformer tokenization: a hand-computed example, the tie rule, backed streaming, bad input."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from attnprof.singlecell.nicheformer.tokenizer import Tokenizer, align_genes, iter_token_chunks, tokenize_anndata
from attnprof.singlecell.nicheformer.technologies import load_means, technology_means
from attnprof.singlecell.vocab import ASSAY, MODALITY, SPECIES, Vocabulary, context_id

# ---------------------------------------------------------------- the example
# vocabulary index: 0 Actb, 1 Gfap, 2 Mbp, 3 Snap25, 4 Sst, 5 Xist -> token ids 30..35
VOCAB = ["Actb", "Gfap", "Mbp", "Snap25", "Sst", "Xist"]
MEANS = [1.0, 2.0, 0.0, 1.0, 4.0, 1.0]  # Mbp's mean 0 counts as 1 (as in Nicheformer)
# the data: another column order, "Unknown1" is not in the vocabulary, "Xist" is not measured
DATA_GENES = ["Mbp", "Actb", "Unknown1", "Sst", "Gfap", "Snap25"]
COUNTS = np.array(
    [
        # Mbp Actb Unk Sst Gfap Snap25
        [1, 3, 6, 8, 0, 2],  # /20*1e4: Actb 1500, Sst 4000/4 = 1000 = Snap25 (tie), Mbp 500
        [0, 0, 5, 0, 0, 0],  # counts only in a gene outside the vocabulary
        [0, 0, 0, 0, 0, 0],  # a zero-count cell
        [0, 2, 0, 0, 2, 0],  # Actb 2x, Gfap 2x / mean 2
        [4, 0, 0, 0, 0, 0],  # Mbp alone (mean 0 -> 1)
    ],
    dtype=np.float32,
)
CONTEXT = [6, 7, 4]  # mouse, MERFISH, spatial
# by hand, context length 6 (three genes): the Snap25/Sst tie goes to Snap25 (lower vocabulary
# index) although Sst comes first in the data; Mbp (500) is cut by the context length
EXPECTED_6 = np.array(
    [
        CONTEXT + [30, 33, 34],
        CONTEXT + [1, 1, 1],
        CONTEXT + [1, 1, 1],
        CONTEXT + [30, 31, 1],
        CONTEXT + [32, 1, 1],
    ]
)
EXPECTED_FULL_ROW0 = CONTEXT + [30, 33, 34, 32]


def example(sparse: bool, **extra) -> ad.AnnData:
    X = sp.csr_matrix(COUNTS) if sparse else COUNTS.copy()
    obs = pd.DataFrame({"sex": ["female", "male", "female", "male", "female"]}, index=[f"c{i}" for i in range(5)])
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=DATA_GENES), **extra)


def tokenize(adata, context_length=6, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dropped gene; tested on its own below
        return tokenize_anndata(adata, VOCAB, MEANS, context_length=context_length, **kw)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_hand_computed_example(sparse):
    np.testing.assert_array_equal(tokenize(example(sparse)), EXPECTED_6)
    full = tokenize(example(sparse), context_length=10)
    np.testing.assert_array_equal(full[0], EXPECTED_FULL_ROW0 + [1, 1, 1])


def test_lengths_and_chunk_width():
    tok = Tokenizer(VOCAB, MEANS, context_length=6)
    with pytest.warns(UserWarning):
        alignment = align_genes(DATA_GENES, tok.vocab)
    tokens, lengths = tok.tokenize_rows(COUNTS, alignment)
    np.testing.assert_array_equal(lengths, [6, 3, 3, 5, 4])
    assert tokens.shape == (5, 6)
    tokens, lengths = tok.tokenize_rows(COUNTS[1:3], alignment)
    assert tokens.shape == (2, 3)  # a chunk is only as wide as its longest cell


def test_missing_genes_dropped_with_count_warning():
    expected = r"1 of the data's 6 genes are not in the vocabulary.*5 are tokenized.*Unknown1"
    with pytest.warns(UserWarning, match=expected):
        align_genes(DATA_GENES, VOCAB)


def test_no_overlap_is_an_error_that_names_both_sides():
    with pytest.raises(ValueError, match=r"none of the data's 3 genes.*vocabulary of 6 genes.*gene_key"):
        align_genes(["ENSMUSG1", "ENSMUSG2", "ENSMUSG3"], VOCAB)


def test_duplicate_data_genes_are_an_error():
    with pytest.raises(ValueError, match="more than once.*var_names_make_unique"):
        align_genes(["Actb", "Actb"], VOCAB)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_backed_file_streams_identical_tokens(tmp_path, sparse):
    path = tmp_path / "example.h5ad"
    example(sparse).write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    try:
        streamed = tokenize(backed, chunk_size=2)
        with pytest.warns(UserWarning, match="1 of the data's 6 genes"):
            chunks = list(iter_token_chunks(backed, Tokenizer(VOCAB, MEANS, context_length=6), chunk_size=2))
    finally:
        backed.file.close()
    np.testing.assert_array_equal(streamed, EXPECTED_6)
    assert [len(c) for c in chunks] == [2, 2, 1]  # read two rows at a time


def test_rows_select_cells_and_skip_chunks():
    adata = example(True)
    rows = np.array([0, 3, 4])
    np.testing.assert_array_equal(tokenize(adata, rows=rows, chunk_size=2), EXPECTED_6[rows])
    tok = Tokenizer(VOCAB, MEANS, context_length=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        chunks = list(iter_token_chunks(adata, tok, rows=np.array([4]), chunk_size=2))
    assert len(chunks) == 1 and chunks[0].rows.tolist() == [4]


def test_layer_and_raw_are_tokenized_not_x():
    counts = example(True)
    adata = example(True)
    adata.layers["counts"] = counts.X.copy()
    adata.raw = counts
    adata.X = sp.csr_matrix(np.log1p(COUNTS) * 3.7)  # normalized data in X must not be used
    np.testing.assert_array_equal(tokenize(adata, layer="counts"), EXPECTED_6)
    np.testing.assert_array_equal(tokenize(adata, use_raw=True), EXPECTED_6)
    with pytest.raises(ValueError, match="no layer 'spliced'.*counts"):
        tokenize(adata, layer="spliced")
    with pytest.raises(ValueError, match="not both"):
        tokenize(adata, layer="counts", use_raw=True)
    with pytest.raises(ValueError, match="no .raw"):
        tokenize(example(True), use_raw=True)


def test_gene_key_picks_a_var_column():
    adata = example(False)
    adata.var["symbol"] = adata.var_names
    adata.var_names = [f"ENS{i}" for i in range(6)]
    np.testing.assert_array_equal(tokenize(adata, gene_key="symbol"), EXPECTED_6)
    with pytest.raises(ValueError, match="no column 'name'.*symbol"):
        tokenize(adata, gene_key="name")


def test_non_integer_counts_warn_and_negative_counts_fail():
    adata = example(False)
    adata.X = COUNTS * 0.5
    with pytest.warns(UserWarning, match="non-integer values.*raw counts"):
        tokenize_anndata(adata, DATA_GENES, context_length=6)
    adata.X = COUNTS - 1
    with pytest.raises(ValueError, match="negative values.*raw counts"):
        tokenize_anndata(adata, DATA_GENES, context_length=6)


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_nan_or_inf_counts_are_refused_before_the_first_chunk(bad, sparse):
    # was: NaN counted as 0 (as Nicheformer's np.nan_to_num does); issue 13 asks for a refusal
    counts = np.tile(COUNTS, (3, 1))  # 15 cells
    counts[[12, 14], 0] = bad  # two cells of the last chunk, one gene
    counts[14, 3] = bad  # a second gene
    adata = ad.AnnData(X=sp.csr_matrix(counts) if sparse else counts, var=pd.DataFrame(index=DATA_GENES))
    chunks = iter_token_chunks(adata, Tokenizer(VOCAB, MEANS, context_length=6), chunk_size=4)
    expected = r"NaN or Inf values in 2 of 15 cells and 2 genes \(e.g. cell '12', gene 'Mbp'\)"
    with pytest.raises(ValueError, match=expected):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            next(chunks)  # nothing is tokenized before the check


# ------------------------------------------------------- the tie rule, at large
def plain_tokens(counts, data_genes, vocab, means, context, context_length):
    """Per cell, in plain Python: value = count * (1e4 / library) / mean, sorted by (-value, vocab index)."""
    index = {g: i for i, g in enumerate(vocab)}
    means = [1.0 if m == 0 else m for m in means]
    out = []
    for cell in counts:
        library = float(sum(float(x) for x in cell)) or 1.0
        scored = []
        for g, x in zip(data_genes, cell):
            if g in index and x > 0:
                scored.append((-(float(x) * (1e4 / library) / means[index[g]]), index[g]))
        ids = [i + 30 for _, i in sorted(scored)][: context_length - 3]
        out.append(context + ids + [1] * (context_length - 3 - len(ids)))
    return np.array(out)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_matches_plain_python_with_many_ties(data):
    n_genes = data.draw(st.integers(1, 8))
    n_cells = data.draw(st.integers(1, 6))
    counts = np.array(
        data.draw(st.lists(st.lists(st.integers(0, 3), min_size=n_genes, max_size=n_genes),
                           min_size=n_cells, max_size=n_cells)), dtype=np.float64)  # fmt: skip
    data_genes = [f"g{j}" for j in range(n_genes)]
    vocab = data.draw(st.permutations(data_genes + ["extra0", "extra1"]))
    means = data.draw(st.lists(st.sampled_from([0.0, 1.0, 2.0, 3.0]), min_size=len(vocab), max_size=len(vocab)))
    context_length = data.draw(st.integers(4, 12))
    sparse = data.draw(st.booleans())
    adata = ad.AnnData(X=sp.csr_matrix(counts) if sparse else counts, var=pd.DataFrame(index=data_genes))
    tokens = tokenize_anndata(adata, vocab, means, context_length=context_length, chunk_size=4)
    np.testing.assert_array_equal(tokens, plain_tokens(counts, data_genes, vocab, means, CONTEXT, context_length))


# ------------------------------------------------ vocabulary, means, context ids
def test_vocabulary_files(tmp_path):
    (tmp_path / "genes.txt").write_text("\n".join(VOCAB) + "\n\n")
    assert Vocabulary.from_file(tmp_path / "genes.txt").genes == VOCAB
    ad.AnnData(X=np.zeros((1, 6)), var=pd.DataFrame(index=VOCAB)).write_h5ad(tmp_path / "model.h5ad")
    assert Vocabulary.from_file(tmp_path / "model.h5ad").genes == VOCAB
    (tmp_path / "gappy.txt").write_text("Actb\n\nGfap\n")
    with pytest.raises(ValueError, match="blank lines.*line 2"):
        Vocabulary.from_file(tmp_path / "gappy.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Vocabulary.from_file(tmp_path / "missing.txt")


def test_token_names_cover_the_embedding_table():
    names = Vocabulary(VOCAB).token_names()
    assert len(names) == len(VOCAB) + 30 + 5
    assert names[:3] == ["<mask>", "<pad>", "<cls>"]
    assert names[4] == "<modality:spatial>" and names[6] == "<species:mouse>" and names[7] == "<assay:MERFISH>"
    assert names[30:36] == VOCAB
    assert len(set(names)) == len(names)


def test_means_and_context_ids(tmp_path):
    # was: load_means mapped NaN and 0 to 1 and refused negatives; now it returns the file as stored and
    # technology_means prepares it per upstream path (issue 10)
    np.save(tmp_path / "means.npy", np.array(MEANS))
    np.testing.assert_array_equal(load_means(tmp_path / "means.npy", 6), MEANS)
    with pytest.raises(ValueError, match="5 entries but the vocabulary has 6 genes"):
        load_means(np.ones(5), 6)
    assert context_id("species", "Mus musculus") == 6 and context_id("assay", "cosmx") == 8
    assert context_id("assay", "10x 3' v3") == 11 and context_id("modality", 3) == 3
    with pytest.raises(ValueError, match="unknown assay 'seqFISH'.*MERFISH"):
        context_id("assay", "seqFISH")


def test_every_upstream_context_id_by_name_and_number():
    # the notebooks' dictionaries: id 9 is "Xenium" in the Xenium notebook, "visium" in two others
    assert context_id("assay", "Xenium") == context_id("assay", "9") == context_id("assay", 9) == 9
    assert context_id("assay", "visium") == 9 and context_id("assay", "merfish") == 7
    assert context_id("assay", "NanoString digital spatial profiling") == 8
    assert context_id("assay", "10x transcription profiling") == 15
    for kind, table in (("species", SPECIES), ("assay", ASSAY), ("modality", MODALITY)):
        for name, i in table.items():
            assert context_id(kind, name) == context_id(kind, str(i)) == context_id(kind, np.int64(i)) == i
    assert sorted(ASSAY.values()) == list(range(7, 19)) and SPECIES == {"human": 5, "mouse": 6}
    with pytest.raises(ValueError, match=r"assay id 19 is not.*9 \(Xenium\)"):
        context_id("assay", "19")


def test_means_per_tokenization_path():
    raw = np.array([np.nan, 0.0, -2370.27, 2.5, 0.4, 1.49, -0.3, 3.0, np.inf])
    np.testing.assert_array_equal(
        technology_means(raw, "notebook"), [1.0, 1.0, -2370.0, 3.0, 1.0, 1.0, 1.0, 3.0, np.finfo(float).max]
    )
    np.testing.assert_array_equal(
        technology_means(raw, "dataset"), [np.nan, 1.0, -2370.27, 2.5, 0.4, 1.49, -0.3, 3.0, np.inf]
    )
    with pytest.raises(ValueError, match="unknown tokenization 'scanpy'.*notebook, dataset"):
        technology_means(raw, "scanpy")


def test_a_means_vector_like_the_merfish_file_is_accepted():
    # the published merfish_mean_script.npy: 48 negative entries (min -2370.27) and 14,505 NaN of 20,310
    rng = np.random.default_rng(0)
    means = rng.gamma(2.0, 3.0, 20_310)
    means[rng.choice(20_310, 14_505, replace=False)] = np.nan
    finite = np.flatnonzero(~np.isnan(means))
    means[finite[:48]] = -rng.uniform(0.1, 2370.27, 48)
    means[finite[0]] = -2370.27
    vocab = [f"ENSG{i:011d}" for i in range(20_310)]
    for tokenization in ("notebook", "dataset"):
        tok = Tokenizer(vocab, means, context_length=1500, tokenization=tokenization)
        assert np.isnan(tok.means).sum() == (14_505 if tokenization == "dataset" else 0)
        assert (tok.means < 0).sum() == 48
        assert np.nanmin(tok.means) == (-2370.0 if tokenization == "notebook" else -2370.27)
    # a 300-gene panel holding negative- and NaN-mean genes tokenizes (every expressed gene ranked)
    panel = np.concatenate([finite[:100], np.flatnonzero(np.isnan(means))[:200]])
    counts = np.random.default_rng(1).poisson(1.0, (8, 300)).astype(np.float32)
    adata = ad.AnnData(X=counts, var=pd.DataFrame(index=[vocab[i] for i in panel]))
    tokens = tokenize_anndata(adata, vocab, means, context_length=400, tokenization="notebook")
    np.testing.assert_array_equal((tokens > 1).sum(1) - 3, (counts > 0).sum(1))
