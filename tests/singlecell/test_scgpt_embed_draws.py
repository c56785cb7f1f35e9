"""scGPT embed mode draws as ``embed_data`` does: after its model's initial weights, in its DataLoader's workers.

Upstream's steps are transcribed here from bowang-lab/scGPT (``scgpt/tasks/cell_emb.py``,
``scgpt/model/model.py``, ``scgpt/data_collator.py``, ``scgpt/preprocess.py``) and run with torch's own
``DataLoader`` (worker processes, ``SequentialSampler``) after ``torch.manual_seed(S)``; attnprof's tokens must
equal theirs cell by cell: the random samples of long cells, the random bins of tied values, the short cells.
"""

from __future__ import annotations

import os

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from torch import nn
from torch.utils.data import DataLoader, SequentialSampler

from attnprof.singlecell.family import iter_family_chunks
from attnprof.singlecell.scgpt import scgpt_front_end
from attnprof.singlecell.scgpt.draws import UpstreamModel, replay_model_draws, upstream_workers

GENES = [f"g{i}" for i in range(30)]
VOCAB = {g: i for i, g in enumerate(GENES)} | {"<pad>": 30, "<cls>": 31, "<eoc>": 32}
ARGS = {"embsize": 8, "nheads": 2, "d_hid": 16, "nlayers": 2, "n_layers_cls": 3, "dropout": 0.2,
        "pad_token": "<pad>", "pad_value": -2, "n_bins": 51, "input_emb_style": "continuous"}  # fmt: skip
MAX_LENGTH = 10


# ------------------------------------------------------------------ upstream's steps, transcribed
class UpstreamTransformerModel(nn.Module):
    """``TransformerModel.__init__`` (model.py L21-158) as ``embed_data`` calls it (cell_emb.py L237-257) without
    flash-attn: each submodule built by the torch class upstream uses, in upstream's order."""

    def __init__(self, ntoken, d_model, nhead, d_hid, nlayers, nlayers_cls, dropout, pad_id):
        super().__init__()
        self.encoder = nn.Module()  # GeneEncoder (L79, L717-728)
        self.encoder.embedding = nn.Embedding(ntoken, d_model, padding_idx=pad_id)
        self.encoder.enc_norm = nn.LayerNorm(d_model)
        self.value_encoder = nn.Module()  # ContinuousValueEncoder (L83, L764-771)
        self.value_encoder.dropout = nn.Dropout(p=dropout)
        self.value_encoder.linear1 = nn.Linear(1, d_model)
        self.value_encoder.activation = nn.ReLU()
        self.value_encoder.linear2 = nn.Linear(d_model, d_model)
        self.value_encoder.norm = nn.LayerNorm(d_model)
        encoder_layers = nn.TransformerEncoderLayer(d_model, nhead, d_hid, dropout, batch_first=True)  # L124-126
        self.transformer_encoder = nn.TransformerEncoder(encoder_layers, nlayers)  # L127
        self.decoder = nn.Module()  # ExprDecoder (L129-133, L843-857)
        self.decoder.fc = nn.Sequential(nn.Linear(d_model, d_model), nn.LeakyReLU(), nn.Linear(d_model, d_model),
                                        nn.LeakyReLU(), nn.Linear(d_model, 1))  # fmt: skip
        self.cls_decoder = nn.Module()  # ClsDecoder(d_model, n_cls=1, nlayers=nlayers_cls) (L134, L889-903)
        self.cls_decoder._decoder = nn.ModuleList()
        for _ in range(nlayers_cls - 1):
            self.cls_decoder._decoder.extend([nn.Linear(d_model, d_model), nn.ReLU(), nn.LayerNorm(d_model)])
        self.cls_decoder.out_layer = nn.Linear(d_model, 1)
        self.mvc_decoder = nn.Module()  # MVCDecoder, arch_style "inner product" (L135-141, L920-945)
        self.mvc_decoder.gene2query = nn.Linear(d_model, d_model)
        self.mvc_decoder.query_activation = nn.Sigmoid()
        self.mvc_decoder.W = nn.Linear(d_model, d_model, bias=False)
        self.sim = nn.Module()  # Similarity(temp=0.5) (L150, L833-836)
        self.sim.cos = nn.CosineSimilarity(dim=-1)
        self.creterion_cce = nn.CrossEntropyLoss()  # L151
        self.encoder.embedding.weight.data.uniform_(-0.1, 0.1)  # init_weights (L153-158)


class UpstreamDataset(torch.utils.data.Dataset):
    """get_batch_cell_embeddings' Dataset (cell_emb.py L64-90)."""

    def __init__(self, count_matrix, gene_ids):
        self.count_matrix, self.gene_ids = count_matrix, gene_ids

    def __len__(self):
        return len(self.count_matrix)

    def __getitem__(self, idx):
        row = self.count_matrix[idx]
        nonzero_idx = np.nonzero(row)[0]
        genes = np.insert(self.gene_ids[nonzero_idx], 0, VOCAB["<cls>"])
        values = np.insert(row[nonzero_idx], 0, ARGS["pad_value"])
        return {"id": idx, "genes": torch.from_numpy(genes).long(), "expressions": torch.from_numpy(values).float()}


def upstream_digitize(x, bins):
    """preprocess.py ``_digitize`` (L239-271), side="both"."""
    left_digits = np.digitize(x, bins)
    right_difits = np.digitize(x, bins, right=True)
    rands = np.random.rand(len(x))  # the global numpy generator: the worker's, seeded by torch
    return np.ceil(rands * (right_difits - left_digits) + left_digits).astype(np.int64)


def upstream_binning(row: torch.Tensor, n_bins: int) -> torch.Tensor:
    """preprocess.py ``binning`` (L274-303) on a tensor row."""
    row = row.cpu().numpy()
    if row.max() == 0:
        return torch.zeros_like(torch.from_numpy(row))
    if row.min() <= 0:
        non_zero_ids = row.nonzero()
        non_zero_row = row[non_zero_ids]
        binned_row = np.zeros_like(row, dtype=np.int64)
        bins = np.quantile(non_zero_row, np.linspace(0, 1, n_bins - 1))
        binned_row[non_zero_ids] = upstream_digitize(non_zero_row, bins)
    else:
        binned_row = upstream_digitize(row, np.quantile(row, np.linspace(0, 1, n_bins - 1)))
    return torch.from_numpy(binned_row)


class UpstreamCollator:
    """DataCollator(do_padding=True, pad_token_id, pad_value, do_mlm=False, do_binning=True, max_length,
    sampling=True, keep_first_n_tokens=1) (cell_emb.py L96-105): ``__call__`` (data_collator.py L64-113),
    ``_sample`` (L151-171), ``_pad`` (L173-202)."""

    def __init__(self, max_length):
        self.max_length, self.pad_token_id, self.pad_value = max_length, VOCAB["<pad>"], ARGS["pad_value"]

    def __call__(self, examples):
        max_ori_len = max(len(example["genes"]) for example in examples)
        _max_length = self.max_length if max_ori_len >= self.max_length else max_ori_len
        padded_genes, padded_expressions = [], []
        for example in examples:
            genes, expressions = example["genes"], example["expressions"]
            expressions[1:] = upstream_binning(expressions[1:], n_bins=51)
            if len(genes) > _max_length:  # _sample, keep_first_n_tokens=1: torch's global generator (the worker's)
                indices = torch.randperm(len(genes) - 1, device=genes.device)[: _max_length - 1]
                indices = torch.cat([torch.arange(1), indices + 1], dim=0)
                genes, expressions = genes[indices], expressions[indices]
            elif len(genes) < _max_length:
                pad = _max_length - len(genes)
                genes = torch.cat([genes, torch.full((pad,), self.pad_token_id, dtype=genes.dtype)])
                expressions = torch.cat([expressions, torch.full((pad,), self.pad_value, dtype=expressions.dtype)])
            padded_genes.append(genes)
            padded_expressions.append(expressions)
        return {"gene": torch.stack(padded_genes, dim=0), "expr": torch.stack(padded_expressions, dim=0)}


def upstream_embed_data_inputs(counts, seed, workers, batch_size):
    """The collated (genes, values) of each cell in ``embed_data`` after ``torch.manual_seed(seed)`` (and numpy's
    seed, as ``scgpt.utils.set_seed`` sets both), with ``workers`` DataLoader workers."""
    np.random.seed(seed)
    torch.manual_seed(seed)
    UpstreamTransformerModel(len(VOCAB), ARGS["embsize"], ARGS["nheads"], ARGS["d_hid"], ARGS["nlayers"],
                             ARGS["n_layers_cls"], ARGS["dropout"], VOCAB["<pad>"])  # fmt: skip
    gene_ids = np.array([VOCAB[g] for g in GENES])  # embed_data keeps the vocabulary genes only (L212-229)
    dataset = UpstreamDataset(counts, gene_ids)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=SequentialSampler(dataset),
                        collate_fn=UpstreamCollator(MAX_LENGTH), drop_last=False, num_workers=workers)  # fmt: skip
    cells = []
    for batch in loader:
        for genes, values in zip(batch["gene"], batch["expr"]):
            kept = genes != VOCAB["<pad>"]
            cells.append((genes[kept].tolist(), values[kept].long().tolist()))
    return dict(enumerate(cells))


# ------------------------------------------------------------------ the data and attnprof's side
def counts_of(seed=0, n_cells=23):
    """Integer counts (ties on quantile edges), every cell with vocabulary counts (embed_data fails without),
    some cells longer than MAX_LENGTH - 1 genes and some shorter."""
    rng = np.random.default_rng(seed)
    density = rng.uniform(0.1, 0.9, size=(n_cells, 1))
    counts = (rng.random((n_cells, len(GENES))) < density) * rng.poisson(3, (n_cells, len(GENES))).clip(1, None)
    counts[:, 0] += counts.sum(1) == 0
    return counts.astype(np.float32)


def adata_of(counts):
    """The cells with one more gene outside the vocabulary, which embed_data drops first."""
    X = np.concatenate([counts[:, :5], np.full((len(counts), 1), 4, np.float32), counts[:, 5:]], axis=1)
    return ad.AnnData(sp.csr_matrix(X), var=pd.DataFrame(index=GENES[:5] + ["not_in_vocab"] + GENES[5:]))


def attnprof_inputs(front, adata, rows=None, chunk_size=4):
    all_rows = np.arange(adata.n_obs)
    out = {}
    for c in iter_family_chunks(adata, front, rows=all_rows if rows is None else rows, chunk_size=chunk_size,
                                stream_rows=all_rows):  # fmt: skip
        for r, codes, n in zip(c.rows, c.tokens, c.lengths):
            ids, values, _ = front._unpack(torch.from_numpy(codes[:n]))
            out[int(r)] = (ids.tolist(), values.tolist())
    return out


def embed_data_front(seed, workers, batch_size):
    return scgpt_front_end(VOCAB, ARGS, mode="embed", max_length=MAX_LENGTH, seed=seed).with_loader(workers, batch_size)


# ------------------------------------------------------------------ the tests
@pytest.mark.parametrize("seed", [0, 7])
def test_model_draws_leave_the_generator_as_building_upstreams_model(seed):
    torch.manual_seed(seed)
    UpstreamTransformerModel(len(VOCAB), 8, 2, 16, 2, 3, 0.2, VOCAB["<pad>"])
    generator = torch.Generator().manual_seed(seed)
    replay_model_draws(generator, UpstreamModel.from_args(ARGS, len(VOCAB)))
    assert torch.equal(generator.get_state(), torch.get_rng_state())


@pytest.mark.filterwarnings("ignore:cells with more than")
@pytest.mark.parametrize(("workers", "batch_size", "seed"), [(1, 3, 0), (2, 2, 7), (3, 4, 11), (2, 5, 3), (0, 3, 5)])
def test_embed_mode_equals_embed_data_in_its_workers(workers, batch_size, seed):
    counts = counts_of(seed)
    lengths = (counts > 0).sum(1) + 1
    assert (lengths > MAX_LENGTH).sum() >= 5 and (lengths <= MAX_LENGTH).sum() >= 5  # both kinds of cell
    upstream = upstream_embed_data_inputs(counts, seed, workers, batch_size)
    got = attnprof_inputs(embed_data_front(seed, workers, batch_size), adata_of(counts))
    assert got == upstream
    assert all(len(got[r][0]) == min(n, MAX_LENGTH) for r, n in enumerate(lengths))


@pytest.mark.filterwarnings("ignore:cells with more than")
def test_shards_get_the_draws_of_the_whole_run_and_other_states_differ():
    counts, seed = counts_of(1), 1
    upstream = upstream_embed_data_inputs(counts, seed, workers=2, batch_size=3)
    front = embed_data_front(seed, 2, 3)
    odd = np.arange(1, len(counts), 2)
    assert attnprof_inputs(front, adata_of(counts), rows=odd, chunk_size=5) == {int(r): upstream[r] for r in odd}
    long_cells = [r for r, n in enumerate((counts > 0).sum(1) + 1) if n > MAX_LENGTH]
    for other in (embed_data_front(seed, 3, 3), embed_data_front(seed, 2, 4),
                  scgpt_front_end(VOCAB, ARGS, mode="embed", max_length=MAX_LENGTH, seed=seed)):  # fmt: skip
        got = attnprof_inputs(other, adata_of(counts))
        assert any(got[r][0] != upstream[r][0] for r in long_cells)  # the workers and their seeds matter


def test_loader_settings_are_recorded_and_checked():
    front = embed_data_front(0, None, None)
    cpus = len(os.sched_getaffinity(0))  # embed_data's num_workers=min(len(os.sched_getaffinity(0)), batch_size)
    assert front.tokenizer.settings()["embed_data_workers"] == upstream_workers(64) == min(cpus, 64)
    assert front.tokenizer.settings()["embed_data_batch_size"] == 64
    with pytest.warns(UserWarning, match=r"embed_data draws them after torch.manual_seed\(0\) with batch_size 64"):
        attnprof_inputs(front, adata_of(counts_of(0)))
    with pytest.raises(ValueError, match="n_layers_cls"):
        scgpt_front_end(VOCAB, {k: v for k, v in ARGS.items() if k != "n_layers_cls"}).with_loader(2, 4)
    with pytest.raises(ValueError, match="0 or more"):
        embed_data_front(0, -1, 4)
    tutorial = scgpt_front_end(VOCAB, ARGS, mode="tutorial", max_length=40)
    assert tutorial.with_loader() is tutorial
    with pytest.raises(ValueError, match="read in embed mode"):
        tutorial.with_loader(2, None)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_cli_passes_the_loader_and_refuses_it_in_tutorial_mode(tmp_path, capsys):
    from attnprof import Profile
    from attnprof.cli import main
    from attnprof.singlecell.scgpt import ScGPT, ScGPTConfig, save_scgpt

    config = ScGPTConfig(n_tokens=len(VOCAB), d_model=8, n_heads=2, d_hid=16, n_layers=1, dropout=0.0, pad_id=30)
    folder = save_scgpt(ScGPT(config), tmp_path / "scgpt", VOCAB)
    adata = adata_of(counts_of(2, n_cells=8))
    adata.obs["sex"] = pd.Categorical(["female", "male"] * 4)
    adata.write_h5ad(tmp_path / "cells.h5ad")
    base = ["run", str(tmp_path / "cells.h5ad"), "--groupby", "sex", "--model", str(folder), "--max-length",
            str(MAX_LENGTH), "--window", "4", "--panel", "g1,g2", "--min-cells", "1", "--quiet",
            "--backend", "torch"]  # fmt: skip
    code = main(base + ["--scgpt-workers", "3", "--scgpt-batch-size", "2", "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr()
    settings = Profile.load(tmp_path / "out" / "profile.npz").meta["options"]["tokenizer"]
    assert (settings["embed_data_workers"], settings["embed_data_batch_size"]) == (3, 2)
    code = main(base + ["--scgpt-mode", "tutorial", "--scgpt-workers", "2", "--out", str(tmp_path / "t")])
    assert code == 2 and "read in embed mode" in capsys.readouterr().err
