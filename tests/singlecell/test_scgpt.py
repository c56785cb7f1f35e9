"""scGPT front end: both preprocessing paths as scGPT's code makes them, checkpoint loading, profile vs need_weights."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from attnprof.adapters.mha import fastpath_disabled
from attnprof.kernels import StatsSpec
from attnprof.kernels.reference import stats_from_probs
from attnprof.singlecell.family import iter_family_chunks
from attnprof.singlecell.registry import load_front_end
from attnprof.singlecell.run import profile_anndata
from attnprof.singlecell.scgpt import ScGPT, ScGPTConfig, load_scgpt, save_scgpt, scgpt_front_end

VOCAB = {"g0": 0, "g1": 1, "g2": 2, "g3": 3, "g4": 4, "g5": 5, "g6": 6, "g7": 7, "<pad>": 8, "<cls>": 9, "<eoc>": 10}
DATA_GENES = ["g0", "g1", "out", "g2", "g3", "g4", "g5", "g6", "g7"]  # "out": not in the vocabulary
COUNTS = np.array([[1, 1, 5, 1, 1, 2, 2, 0, 3],  # ties: several values on equal quantile edges
                   [0, 3, 0, 0, 3, 3, 3, 3, 0],
                   [0, 0, 4, 0, 0, 0, 0, 0, 0],  # counts only outside the vocabulary
                   [2, 5, 1, 7, 1, 1, 9, 4, 6],  # 8 vocabulary genes: longer than max_length 5
                   [1, 0, 0, 0, 0, 0, 0, 0, 0]], dtype=np.float32)  # fmt: skip
SEED = 7
ARGS = {"embsize": 16, "nheads": 2, "d_hid": 32, "nlayers": 2, "dropout": 0.0, "pad_token": "<pad>", "pad_value": -2,
        "n_bins": 51, "input_emb_style": "continuous"}  # fmt: skip
# Expected inputs: from running scGPT's own code once during development (functions of the fetched
# bowang-lab/scGPT snapshot). embed: Dataset.__getitem__ of get_batch_cell_embeddings + DataCollator(do_mlm=False,
# do_binning=True, max_length=5, sampling=True, keep_first_n_tokens=1) in the main process after
# np.random.seed(7), torch.manual_seed(7), on cells 0, 1, 3, 4 (cell 2 makes embed_data crash): the state of
# scgpt_front_end without with_loader. embed_data's own state (its model and DataLoader workers first):
# tests/test_scgpt_embed_draws.py.
UPSTREAM_EMBED = {
    0: ([9, 5, 0, 3, 1], [-2, 37, 24, 7, 6]),
    1: ([9, 4, 6, 5, 3], [-2, 26, 10, 17, 37]),
    3: ([9, 6, 7, 4, 5], [-2, 22, 36, 7, 50]),
    4: ([9, 0], [-2, 20]),
}
# tutorial: scanpy 1.11.5's normalize_total(target_sum=1e4) and log1p on the CSR counts of the vocabulary genes,
# Preprocessor's binning loop (its _digitize) after np.random.seed(7), tokenize_batch(append_cls=True,
# include_zero_gene=False).
UPSTREAM_TUTORIAL = {
    0: ([9, 0, 1, 2, 3, 4, 5, 7], [0, 24, 6, 15, 7, 34, 37, 50]),
    1: ([9, 1, 3, 4, 5, 6], [0, 47, 37, 26, 17, 10]),
    2: ([9], [0]),
    3: ([9, 0, 1, 2, 3, 4, 5, 6, 7], [0, 15, 29, 43, 1, 7, 50, 22, 36]),
    4: ([9, 0], [0, 20]),
}


def data(counts=COUNTS, genes=DATA_GENES):
    adata = ad.AnnData(sp.csr_matrix(counts), var=pd.DataFrame(index=genes))
    adata.obs["sex"] = pd.Categorical((["female", "male"] * len(counts))[: len(counts)])
    return adata


def tiny_scgpt(seed=0):
    config = ScGPTConfig(n_tokens=len(VOCAB), d_model=16, n_heads=2, d_hid=32, n_layers=2, dropout=0.0, pad_id=8)
    torch.manual_seed(seed)
    return ScGPT(config).eval()


def inputs_of(front, adata):
    chunks = iter_family_chunks(adata, front, rows=np.arange(adata.n_obs), chunk_size=2)
    out = {}
    for c in chunks:
        for r, codes, n in zip(c.rows, c.tokens, c.lengths):
            ids, values, _ = front._unpack(torch.from_numpy(codes[:n]))
            out[int(r)] = (ids.tolist(), values.tolist())
    return out


@pytest.mark.filterwarnings("ignore:1 of the data's")
def test_embed_path_equals_embed_data_collator():
    front = scgpt_front_end(VOCAB, ARGS, mode="embed", max_length=5, seed=SEED)
    assert inputs_of(front, data()) == UPSTREAM_EMBED  # cell 2 left out: embed_data fails on it


@pytest.mark.filterwarnings("ignore:1 of the data's")
def test_tutorial_path_equals_tutorial_preprocessing():
    front = scgpt_front_end(VOCAB, ARGS, mode="tutorial", max_length=9, seed=SEED)
    assert inputs_of(front, data()) == UPSTREAM_TUTORIAL  # cell 2: only <cls>, as the tutorial keeps it
    with pytest.raises(ValueError, match="raise --max-length"):
        inputs_of(scgpt_front_end(VOCAB, ARGS, mode="tutorial", max_length=5, seed=SEED), data())


@pytest.mark.filterwarnings("ignore:1 of the data's")
def test_random_bins_follow_the_seed_for_tied_values_only():
    """Cell 1's values are all equal: every value lies on all 50 edges and gets a random bin of its own."""
    def embed(seed):
        return inputs_of(scgpt_front_end(VOCAB, ARGS, mode="embed", max_length=20, seed=seed), data())

    one, again, other = embed(1), embed(1), embed(2)
    assert one == again
    assert all(one[r][0] == other[r][0] for r in one)  # the genes do not depend on the seed below max_length
    assert one[1][1] != other[1][1]
    assert len(set(one[1][1][1:])) > 1  # equal counts, different bins


@pytest.mark.parametrize("fused", [True, False])
def test_checkpoint_in_published_layout_loads_exactly(tmp_path, fused):
    model = tiny_scgpt()
    heads = {"decoder.fc.0.weight": torch.zeros(3, 3), "cls_decoder.out_layer.bias": torch.zeros(1)}
    folder = save_scgpt(model, tmp_path / "m", VOCAB, fused=fused, extra=heads)
    if fused:
        assert any(".self_attn.Wqkv.weight" in k for k in torch.load(folder / "best_model.pt"))
    loaded, vocab, args = load_scgpt(folder)
    genes = torch.tensor([[9, 1, 4, 8], [9, 2, 3, 5]])
    values = torch.tensor([[-2.0, 3, 7, -2], [-2.0, 50, 1, 2]])
    padding = genes == 8
    with torch.no_grad():
        assert torch.equal(loaded(genes, values, padding)[~padding], model(genes, values, padding)[~padding])


def test_load_refuses_unmatched_keys(tmp_path):
    model = tiny_scgpt()
    folder = save_scgpt(model, tmp_path / "m", VOCAB)
    state = torch.load(folder / "best_model.pt")
    del state["transformer_encoder.layers.1.self_attn.Wqkv.bias"]
    torch.save(state, folder / "best_model.pt")
    with pytest.raises(ValueError, match=r"lacks 1 weights.*in_proj_bias"):
        load_scgpt(folder)
    save_scgpt(model, folder, VOCAB, extra={"transformer_encoder.layers.0.self_attn.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="refusing to skip"):
        load_scgpt(folder)
    save_scgpt(model, folder, VOCAB, extra={"dsbn.bns.0.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="domain-specific batch norm"):
        load_scgpt(folder)


def test_profile_equals_need_weights_maps(tmp_path):
    model = tiny_scgpt()
    front = scgpt_front_end(VOCAB, ARGS, mode="embed", max_length=5, seed=SEED)
    with pytest.warns(UserWarning, match="left out"):
        profile = profile_anndata(model, data(), "sex", family=front, window=4, backend="torch", progress=False,
                                  panel=["g0", "g4"], batch_size=8)  # fmt: skip
    assert profile.cells == {"female": 2, "male": 2}
    cells = [UPSTREAM_EMBED[r] for r in (0, 1, 3, 4)]
    width = max(len(g) for g, _ in cells)
    genes = torch.tensor([g + [8] * (width - len(g)) for g, _ in cells])
    values = torch.tensor([v + [-2] * (width - len(v)) for _, v in cells], dtype=torch.float32)
    padding = genes == 8
    codes = torch.tensor([0, 1, 1, 0])  # cells 0, 1, 3, 4
    maps = []

    def capture(layer, args):
        w = layer.self_attn(args[0], args[0], args[0], key_padding_mask=padding, need_weights=True,
                            average_attn_weights=False)[1]  # fmt: skip
        maps.append(w)

    hooks = [layer.register_forward_pre_hook(capture) for layer in model.transformer_encoder.layers]
    with fastpath_disabled(), torch.no_grad():
        model(genes, values, padding)
    for h in hooks:
        h.remove()
    spec = StatsSpec(n_groups=2, window=4, vocab_size=len(VOCAB), panel=(0, 4), n_context=1)
    for i, P in enumerate(maps):
        want = stats_from_probs(P, padding, codes, genes, spec)
        for name, value in want.items():
            np.testing.assert_allclose(profile.group_sums()[name][i], value.numpy(), atol=1e-5, rtol=1e-5, err_msg=name)


def test_bad_inputs_get_clear_errors(tmp_path):
    folder = save_scgpt(tiny_scgpt(), tmp_path / "m", VOCAB)
    (folder / "vocab.json").unlink()
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        load_scgpt(folder)
    front = scgpt_front_end(VOCAB, ARGS)
    with pytest.raises(ValueError, match="none of the data's"):
        inputs_of(front, data(genes=[f"x{i}" for i in range(9)]))
    nicheformer = tmp_path / "nicheformer.ckpt"
    nicheformer.write_bytes(b"x")
    with pytest.raises(ValueError, match="holds a nicheformer model"):
        load_front_end("scgpt", nicheformer)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="holds a geneformer model"):
        load_front_end("scgpt", bert)
    with pytest.raises(ValueError, match="unknown scGPT preprocessing"):
        scgpt_front_end(VOCAB, ARGS, mode="hvg")


@pytest.mark.filterwarnings("ignore:1 of the data's")
@pytest.mark.parametrize("mode", ["embed", "tutorial"])
def test_inputs_do_not_depend_on_the_storage(mode):
    adata = data()
    adata.X = COUNTS.copy()
    max_length = 5 if mode == "embed" else 9
    want = UPSTREAM_EMBED if mode == "embed" else UPSTREAM_TUTORIAL
    assert inputs_of(scgpt_front_end(VOCAB, ARGS, mode=mode, max_length=max_length, seed=SEED), adata) == want


def test_non_counts_are_named():
    front = scgpt_front_end(VOCAB, ARGS, mode="tutorial", max_length=9)
    with pytest.warns(UserWarning, match="non-integer values: scgpt tokenizes raw counts"):
        inputs_of(front, data(COUNTS / 3))
    with pytest.raises(ValueError, match="negative values"):
        inputs_of(front, data(COUNTS - 1))


def test_duplicated_gene_names_are_tokenized_as_scgpt_maps_them():
    """embed_data maps every var column by name (``vocab[gene]``) and keeps them all: a name given twice is the
    same gene id twice in a cell. attnprof does the same, with a warning, instead of refusing the data."""
    genes = ["g0", "g1", "g1", "g2"]
    counts = np.array([[1, 2, 3, 0], [0, 4, 0, 5]], dtype=np.float32)
    adata = ad.AnnData(sp.csr_matrix(counts), var=pd.DataFrame(index=genes))
    adata.obs["sex"] = pd.Categorical(["female", "male"])
    front = scgpt_front_end(VOCAB, ARGS, mode="embed", max_length=20, seed=SEED)
    with pytest.warns(UserWarning, match=r"names 1 genes more than once .*same gene id"):
        got = inputs_of(front, adata)
    gene_ids = np.array([VOCAB[g] for g in genes])  # upstream: adata.var["id_in_vocab"]
    upstream = {i: [VOCAB["<cls>"], *gene_ids[np.nonzero(row)[0]].tolist()] for i, row in enumerate(counts)}
    assert {r: ids for r, (ids, _) in got.items()} == upstream == {0: [9, 0, 1, 1], 1: [9, 1, 2]}


@pytest.mark.filterwarnings("ignore:1 of the data's")
def test_sampling_long_cells_says_which_generator_state_it_reproduces():
    front = scgpt_front_end(VOCAB, ARGS, mode="embed", max_length=5, seed=SEED)
    with pytest.warns(UserWarning, match=r"right after torch.manual_seed\(7\) in one process.*docs/reliability.md"):
        inputs_of(front, data())
