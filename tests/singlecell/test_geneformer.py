"""Geneformer front end: tokens as Geneformer's tokenizer makes them, model loading, profile vs eager maps."""

from __future__ import annotations

import pickle

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")

from attnprof.kernels.reference import stats_from_probs  # noqa: E402
from attnprof.singlecell.family import iter_family_chunks
from attnprof.singlecell.registry import load_front_end  # noqa: E402
from attnprof.singlecell.geneformer import geneformer_front_end, load_geneformer_model  # noqa: E402
from attnprof.singlecell.run import profile_anndata  # noqa: E402

ENSEMBL = ["ENSG01", "ENSG02", "ENSGXX", "ENSG03", "ENSG04", "ENSG05", "ENSG06"]  # ENSGXX: not in the dictionary
V2_TOKENS = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3,
             "ENSG01": 4, "ENSG02": 5, "ENSG03": 6, "ENSG04": 7, "ENSG05": 8, "ENSG06": 9}  # fmt: skip
V1_TOKENS = {"<pad>": 0, "<mask>": 1, **{f"ENSG0{i}": i + 1 for i in range(1, 7)}}
MEDIANS = {"ENSG01": 2.0, "ENSG02": 0.5, "ENSG03": 1.5, "ENSG04": 3.0, "ENSG05": 1.0, "ENSG06": 0.25}
COUNTS = np.array([[3, 0, 5, 1, 7, 2, 0],
                   [0, 4, 0, 0, 1, 9, 3],
                   [0, 0, 6, 0, 0, 0, 0],  # counts only in ENSGXX: no dictionary gene
                   [5, 1, 2, 8, 2, 3, 1],
                   [1, 1, 1, 1, 1, 1, 1]], dtype=np.float32)  # fmt: skip
# Expected input_ids: from running Geneformer's own code once during development (the fetched
# ctheodoris/Geneformer tokenizer: X / n_counts * 10_000 / medians, csr_matrix, rank_genes, then
# create_dataset's truncation; V2 with <cls>=2/<eos>=3 and model_input_size 5). Cell 2 is dropped by V2.
UPSTREAM_V2_RANKED = [[7, 8, 4, 6], [9, 8, 5, 7], [], [6, 9, 8, 4, 5, 7], [9, 5, 8, 6, 4, 7]]
UPSTREAM_V2_SIZE5 = [[2, 7, 8, 4, 3], [2, 9, 8, 5, 3], None, [2, 6, 9, 8, 3], [2, 9, 5, 8, 3]]


def data(counts=COUNTS, ensembl=ENSEMBL):
    adata = ad.AnnData(sp.csr_matrix(counts), var=pd.DataFrame({"ensembl_id": ensembl}, index=[f"g{i}" for i in range(len(ensembl))]))
    adata.obs["n_counts"] = np.asarray(counts.sum(1), dtype=np.float64)
    adata.obs["sex"] = pd.Categorical(["female", "male"] * (len(counts) // 2) + ["female"] * (len(counts) % 2))
    return adata


def tiny_bert(vocab_size=10, positions=4096, seed=0):
    config = transformers.BertConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=positions, pad_token_id=0,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, hidden_act="relu")  # fmt: skip
    torch.manual_seed(seed)
    return transformers.BertForMaskedLM(config).eval()


def tokens_of(front, adata):
    rows = np.arange(adata.n_obs)
    chunks = list(iter_family_chunks(adata, front, rows=rows, gene_key="ensembl_id", chunk_size=2))
    out = {}
    for c in chunks:
        for r, codes, n in zip(c.rows, c.tokens, c.lengths):
            out[int(r)] = front.gene_ids(torch.from_numpy(codes[:n])).tolist()
    return out


@pytest.mark.filterwarnings("ignore:1 of the data's")
def test_tokens_equal_geneformer_v2_and_v1():
    model = tiny_bert()
    v2 = geneformer_front_end(model, V2_TOKENS, MEDIANS)
    assert v2.context_length == 4096 and v2.n_context == 1
    got = tokens_of(v2, data())
    assert 2 not in got  # dropped, as V2's tokenize_anndata drops cells without dictionary genes
    for r, ranked in enumerate(UPSTREAM_V2_RANKED):
        if ranked:
            assert got[r] == [2, *ranked, 3]
    short = tokens_of(geneformer_front_end(model, V2_TOKENS, MEDIANS, input_size=5), data())
    for r, want in enumerate(UPSTREAM_V2_SIZE5):
        assert short.get(r) == want
    # V1 dictionary: no special tokens, 2048 by default; the same ranks with V1's token ids
    v1 = geneformer_front_end(tiny_bert(vocab_size=8), V1_TOKENS, MEDIANS)
    assert v1.context_length == 2048 and v1.n_context == 0
    v1_of = {V2_TOKENS[g]: V1_TOKENS[g] for g in MEDIANS}
    got = tokens_of(v1, data())
    for r, ranked in enumerate(UPSTREAM_V2_RANKED):
        if ranked:
            assert got[r] == [v1_of[t] for t in ranked]
    assert tokens_of(geneformer_front_end(tiny_bert(vocab_size=8), V1_TOKENS, MEDIANS, input_size=2), data())[3] == [
        v1_of[t] for t in UPSTREAM_V2_RANKED[3][:2]
    ]


def test_ties_follow_numpys_default_argsort_in_var_order():
    """40 genes with equal normalized values: the order is np.argsort(-values) over var-column order (the
    quirk of Geneformer's rank_genes), whatever vocabulary order says."""
    n = 40
    genes = [f"ENSG{i:03d}" for i in range(n)]
    token_dict = {"<pad>": 0, "<mask>": 1, **{g: 2 + (7 * i) % n for i, g in enumerate(genes)}}
    medians = {g: 1.0 for g in genes}
    counts = np.ones((2, n), dtype=np.float32)
    counts[1, ::3] = 2
    adata = data(counts, genes)
    front = geneformer_front_end(tiny_bert(vocab_size=n + 2), token_dict, medians)
    got = tokens_of(front, adata)
    token_of_column = np.array([token_dict[g] for g in genes])
    for r in range(2):
        values = counts[r] / counts[r].sum() * 10_000 / 1.0
        assert got[r] == token_of_column[np.argsort(-values)].tolist()


def test_cells_with_zero_n_counts_are_left_out_and_counted():
    adata = data()
    adata.obs.loc[adata.obs_names[1], "n_counts"] = 0
    front = geneformer_front_end(tiny_bert(), V2_TOKENS, MEDIANS)
    with pytest.warns(UserWarning, match="not in the vocabulary"):
        got = tokens_of(front, adata)
    assert sorted(got) == [0, 3, 4]


def save_folder(model, path, layout="safetensors"):
    """A model folder as released: config.json with model.safetensors (V2) or pytorch_model.bin (V1)."""
    model.save_pretrained(path)
    if layout == "bin":
        (path / "model.safetensors").unlink()
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, path / "pytorch_model.bin")
    return path


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_checkpoint_loads_and_profile_equals_eager_attention(tmp_path, layout):
    model = tiny_bert()
    folder = save_folder(model, tmp_path / "gf", layout)
    loaded = load_geneformer_model(folder)
    ids = torch.tensor([[2, 7, 8, 4, 3, 0], [2, 9, 8, 5, 6, 3]])
    mask = (ids != 0).long()
    model.set_attn_implementation("eager")  # the loaded model is eager: same kernels, same bits
    with torch.no_grad():
        want = model.bert(ids, attention_mask=mask).last_hidden_state
        got = loaded(ids, attention_mask=mask).last_hidden_state
    assert torch.equal(got[mask.bool()], want[mask.bool()])

    adata = data()
    with pytest.warns(UserWarning):
        profile = profile_anndata(loaded, adata, "sex", gene_key="ensembl_id", window=8, backend="torch",
                                  family=geneformer_front_end(loaded, V2_TOKENS, MEDIANS), progress=False,
                                  panel=["ENSG01", "ENSG05"], batch_size=8)  # fmt: skip
    assert profile.cells == {"female": 2, "male": 2}  # cell 2 left out
    # the oracle: eager maps of the same cells (batch order does not change any sum)
    cells = [[2, *r, 3] for r in UPSTREAM_V2_RANKED if r]
    width = max(map(len, cells))
    ids = torch.tensor([c + [0] * (width - len(c)) for c in cells])
    real = ids != 0
    codes = torch.tensor([0, 1, 1, 0])  # cells 0, 1, 3, 4: female, male, male, female
    with torch.no_grad():
        maps = loaded(ids, attention_mask=real.long(), output_attentions=True).attentions
    from attnprof.kernels import StatsSpec

    spec = StatsSpec(n_groups=2, window=8, vocab_size=10, panel=(4, 8), n_context=1)
    for i, P in enumerate(maps):
        want = stats_from_probs(P, ~real, codes, ids, spec)
        for name, value in want.items():
            np.testing.assert_allclose(profile.group_sums()[name][i], value.numpy(), atol=1e-5, rtol=1e-5, err_msg=name)


def test_bad_inputs_get_clear_errors(tmp_path):
    model = tiny_bert()
    folder = save_folder(model, tmp_path / "gf")
    with open(tmp_path / "tokens.pkl", "wb") as f:
        pickle.dump(V2_TOKENS, f)
    with pytest.raises(FileNotFoundError, match="gene median dictionary"):
        load_front_end("geneformer", folder, token_dictionary=tmp_path / "tokens.pkl", gene_medians=tmp_path / "no.pkl")
    with pytest.raises(ValueError, match="--gene-medians"):
        load_front_end("geneformer", folder, token_dictionary=tmp_path / "tokens.pkl")
    with pytest.raises(ValueError, match="no median"):
        geneformer_front_end(model, V2_TOKENS, {"ENSG01": 1.0})
    with pytest.raises(ValueError, match="model embeds 8 tokens"):
        geneformer_front_end(tiny_bert(vocab_size=8), V2_TOKENS, MEDIANS)
    with pytest.raises(ValueError, match="none of the data's"):
        tokens_of(geneformer_front_end(model, V2_TOKENS, MEDIANS), data(ensembl=[f"X{i}" for i in range(7)]))
    adata = data()
    del adata.obs["n_counts"]
    with pytest.raises(ValueError, match="n_counts"):
        tokens_of(geneformer_front_end(model, V2_TOKENS, MEDIANS), adata)
    partial = save_folder(model, tmp_path / "partial", "bin")
    state = torch.load(partial / "pytorch_model.bin")
    del state["bert.encoder.layer.1.attention.self.query.weight"]
    torch.save(state, partial / "pytorch_model.bin")
    with pytest.raises(ValueError, match="lacks or mismatches weights"):
        load_geneformer_model(partial)
    (tmp_path / "scgpt").mkdir()
    for name in ("args.json", "vocab.json"):
        (tmp_path / "scgpt" / name).write_text("{}")
    with pytest.raises(ValueError, match="holds a scgpt model"):
        load_front_end("geneformer", tmp_path / "scgpt", token_dictionary="t", gene_medians="m")


def unsorted_with_explicit_zeros(counts):
    """The same counts as CSR with explicit zeros and unsorted column indices (valid, and seen in the wild)."""
    X = sp.csr_matrix(counts)
    rows, cols = np.repeat(np.arange(counts.shape[0]), np.diff(X.indptr)), X.indices
    rows = np.concatenate([rows, [0, 1]])
    cols = np.concatenate([cols, [1, 0]])  # (0, 1) and (1, 0) are zero in COUNTS
    data = np.concatenate([X.data, [0, 0]]).astype(counts.dtype)
    order = np.lexsort((-cols, rows))  # per row, columns descending
    X = sp.csr_matrix((data[order], cols[order], np.searchsorted(rows[order], np.arange(counts.shape[0] + 1))),
                      shape=counts.shape)  # fmt: skip
    assert not X.has_sorted_indices and (X.data == 0).any()
    return X


@pytest.mark.filterwarnings("ignore:1 of the data's")
@pytest.mark.parametrize("storage", ["dense", "csr-unsorted-zeros"])
def test_tokens_follow_geneformer_on_either_storage(storage):
    """Dense X and CSR X give Geneformer's tokens; on CSR Geneformer keeps explicit zeros (scipy's multiply
    and csr_matrix keep stored entries) and ranks them last: (0, 1) is ENSG02 (token 5), (1, 0) ENSG01 (4)."""
    adata = data()
    adata.X = COUNTS.copy() if storage == "dense" else unsorted_with_explicit_zeros(COUNTS)
    got = tokens_of(geneformer_front_end(tiny_bert(), V2_TOKENS, MEDIANS), adata)
    zeros = {0: [5], 1: [4]} if storage != "dense" else {}
    assert got == {r: [2, *ranked, *zeros.get(r, []), 3] for r, ranked in enumerate(UPSTREAM_V2_RANKED) if ranked}


@pytest.mark.parametrize("x_dtype", [np.float32, np.int32])
def test_csr_tokens_equal_geneformers_at_near_ties(x_dtype):
    """Geneformer's tokenize_anndata on a CSR matrix, step by step: ``X_view / n_counts * target_sum /
    norm_factor_vector`` (scipy: multiplications by reciprocals), ``sp.csr_matrix``, ``rank_genes`` per row.
    Counts proportional to their medians tie in exact arithmetic, so the last bit decides the order."""
    genes = [f"ENSG{i:03d}" for i in range(8)]
    token_dict = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3, **{g: 4 + i for i, g in enumerate(genes)}}
    base = np.array([3, 1, 7, 5, 2, 6, 9, 11])
    medians = {g: float(m) * 0.37 for g, m in zip(genes, base)}
    n_counts = np.arange(200, 230, dtype=np.float64)  # libraries of these cells (the data's other genes included)
    counts = np.tile(base, (len(n_counts), 1)).astype(x_dtype)
    adata = ad.AnnData(sp.csr_matrix(counts), var=pd.DataFrame({"ensembl_id": genes}, index=genes))
    adata.obs["n_counts"], adata.obs["sex"] = n_counts, "female"
    got = tokens_of(geneformer_front_end(tiny_bert(vocab_size=12), token_dict, medians), adata)

    # upstream's steps (geneformer/tokenizer.py, tokenize_anndata and rank_genes)
    norm_factor_vector = np.array([medians[g] for g in genes])
    coding_miRNA_tokens = np.array([token_dict[g] for g in genes])
    X_view = adata.X[:, np.arange(len(genes))]
    X_norm = sp.csr_matrix(X_view / adata.obs["n_counts"].values[:, None] * 10_000 / norm_factor_vector)
    upstream = {i: [2, *coding_miRNA_tokens[X_norm[i].indices][np.argsort(-X_norm[i].data)].tolist(), 3]
                for i in range(X_norm.shape[0])}  # fmt: skip
    assert got == upstream
    # the dense expression orders some of these cells differently: the test can tell the two apart
    dense = counts / n_counts[:, None] * 10_000 / norm_factor_vector
    as_dense = {i: [2, *coding_miRNA_tokens[np.argsort(-dense[i])].tolist(), 3] for i in range(len(dense))}
    assert sum(as_dense[i] != upstream[i] for i in upstream) >= 5
    adata.X = counts  # dense input keeps numpy's division
    assert tokens_of(geneformer_front_end(tiny_bert(vocab_size=12), token_dict, medians), adata) == as_dense


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from([np.float32, np.float64, np.int32]),
    st.sampled_from([np.float32, np.float64, np.int64]),
    st.sampled_from([np.float32, np.float64]),
    st.integers(0, 2**31 - 1),
)
def test_tokenization_equals_geneformers_expression_bit_for_bit(x_dtype, counts_dtype, median_dtype, seed):
    """attnprof computes on the non-zero entries only; Geneformer on whole chunks: X / n_counts * 10_000 / medians
    with X's, n_counts' and the medians' dtypes (numpy on dense X, scipy's sparse arithmetic on CSR X), then
    csr_matrix and argsort(-values). Same tokens on either storage, also on ties."""
    rng = np.random.default_rng(seed)
    n_cells, n_genes = 6, 25
    counts = (rng.poisson(0.8, (n_cells, n_genes)) * rng.integers(1, 3, n_genes)).astype(x_dtype)  # many ties
    counts[0] = 0
    genes = [f"ENSG{i:03d}" for i in range(n_genes)]
    token_dict = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3,
                  **{g: 4 + int(t) for g, t in zip(genes, rng.permutation(n_genes))}}  # fmt: skip
    medians = {g: median_dtype(m) for g, m in zip(genes, rng.choice([0.5, 1.0, 1.5, 3.0], n_genes))}
    n_counts = (counts.sum(1) + rng.integers(0, 4, n_cells)).astype(counts_dtype)  # totals include other genes
    adata = ad.AnnData(sp.csr_matrix(counts), var=pd.DataFrame({"ensembl_id": genes}, index=genes))
    adata.obs["n_counts"] = n_counts
    adata.obs["sex"] = "female"
    front = geneformer_front_end(tiny_bert(vocab_size=n_genes + 4), token_dict, medians)

    norm = np.array([medians[g] for g in genes])
    tokens = np.array([token_dict[g] for g in genes])
    for X in (sp.csr_matrix(counts), counts):
        adata.X = X
        got = tokens_of(front, adata)
        with np.errstate(invalid="ignore", divide="ignore"):
            normed = sp.csr_matrix(X / n_counts[:, None] * 10_000 / norm)
        for r in range(n_cells):
            row = normed[r]
            ranked = tokens[row.indices][np.argsort(-row.data)]
            if n_counts[r] == 0 or not ranked.size:
                assert r not in got
            else:
                assert got[r] == [2, *ranked.tolist(), 3]
