"""validate: the backend that ran against reference and against the model's own maps; wrong backends fail."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import transformers

import attnprof
import attnprof.kernels as K
from attnprof.kernels.backends import ReferenceBackend, TorchBackend
from attnprof.cli import main
from attnprof.singlecell.demo import demo_model, write_demo_inputs

VOCAB = 60


def nicheformer_batch(seed=0, B=6, L=20):
    """A small Nicheformer and a batch of token ids with per-cell padding (id 1), two groups."""
    model = demo_model(VOCAB, seed=seed)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(30, VOCAB, (B, L), generator=g)
    tokens[:, :3] = torch.tensor([6, 7, 4])  # species, assay, modality
    for b, n in enumerate([L, 5, 12, 4, L - 1, 9][:B]):
        tokens[b, n:] = 1
    return model, tokens, np.array(["f", "m"] * (B // 2))


def check(model, tokens, groups, backend, **extra):
    return attnprof.validate(model, (tokens,), groups=groups, tokens=tokens, backend=backend,
                             genes=[str(i) for i in range(VOCAB + 5)], panel=[31, 35], window=8, n_context=3,
                             **extra)  # fmt: skip


@pytest.mark.parametrize("backend", ["auto", "torch", "reference", pytest.param("triton", marks=pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="the triton backend is an extra: pip install \"attnprof[gpu]\""))])
def test_real_backends_pass_against_reference_and_the_models_own_maps(backend):
    model, tokens, groups = nicheformer_batch()
    table = check(model, tokens, groups, backend)
    assert table["ok"].all(), table[~table["ok"]]
    assert set(table["backend"]) == {"torch" if backend == "auto" else backend}  # what ran, never "auto"
    own = table[table["against"].str.startswith("own maps: nn.MultiheadAttention(need_weights=True")]
    assert set(own["quantity"]) == set(attnprof.kernels.sum_shapes(K.StatsSpec(2, 8, VOCAB + 5, (31, 35), 3), 4))
    assert own["max_abs_err"].max() < 1e-4 and (own["max_rel_err"] <= own["tolerance"]).all()


def swap_heads(recv):
    """A plausible kernel bug: the gene sums of heads 0 and 1 exchanged (head axis: dim 1 or 2)."""
    recv[..., [0, 1], :] = recv[..., [1, 0], :].clone()


def inject_torch_bug(monkeypatch):
    real = TorchBackend.cells

    def wrong(self, q, k, v, plan, scale):
        out, cells = real(self, q, k, v, plan, scale)
        cells.received[:, [0, 1]] = cells.received[:, [1, 0]].clone()  # [pairs, heads]
        return out, cells

    monkeypatch.setattr(TorchBackend, "cells", wrong)


def inject_reference_bug(monkeypatch):
    real = ReferenceBackend.cells

    def wrong(self, q, k, v, plan, scale):
        out, result = real(self, q, k, v, plan, scale)
        for name in ("recv_sum", "recv_sq"):  # [labelings, G, H, V_b]: this batch's sums
            swap_heads(result.sums[name])
        return out, result

    monkeypatch.setattr(ReferenceBackend, "cells", wrong)


def test_an_injected_wrong_backend_fails(monkeypatch):
    inject_torch_bug(monkeypatch)
    model, tokens, groups = nicheformer_batch()
    table = check(model, tokens, groups, "torch")
    failed = table[~table["ok"]]
    assert set(failed["quantity"]) == {"recv_sum", "recv_sq"}  # per-cell values swapped: squares too
    assert {a.split(":")[0] for a in failed["against"]} == {"reference", "own maps"}


def test_a_bug_shared_with_the_reference_is_caught_by_the_models_own_maps(monkeypatch):
    inject_torch_bug(monkeypatch)
    inject_reference_bug(monkeypatch)
    model, tokens, groups = nicheformer_batch()
    table = check(model, tokens, groups, "torch")
    assert table.loc[table["against"] == "reference", "ok"].all()  # both wrong the same way
    failed = table[~table["ok"]]
    assert set(failed["quantity"]) == {"recv_sum", "recv_sq"} and failed["against"].str.startswith("own maps").all()


def test_hugging_face_models_are_checked_against_output_attentions():
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, vocab_size=VOCAB, initializer_range=0.2)  # fmt: skip
    model = transformers.BertModel(config).eval()
    ids = torch.randint(1, VOCAB, (4, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[1, 5:] = mask[3, 2:] = 0
    before = model.config._attn_implementation
    table = attnprof.validate(model, {"input_ids": ids, "attention_mask": mask}, groups=[0, 1, 0, 1], tokens=ids,
                              genes=VOCAB, window=6, backend="torch")  # fmt: skip
    assert table["ok"].all(), table[~table["ok"]]
    own = table[table["against"].str.contains("output_attentions=True")]
    assert set(own["quantity"]) == set(table.loc[table["against"] == "reference", "quantity"])  # every sum
    assert model.config._attn_implementation == before  # restored


def test_cli_validate_prints_the_backend_that_ran_and_fails_on_a_wrong_one(tmp_path, monkeypatch, capsys):
    inputs = write_demo_inputs(tmp_path, n_cells=12, n_genes=40, seed=3)
    argv = ["validate", str(inputs["data.h5ad"]), "--model", str(inputs["model.ckpt"]), "--vocab",
            str(inputs["vocab.txt"]), "--means", str(inputs["means.npy"]), "--groupby", "sex", "--cells", "8",
            "--panel", "Esr1,Ar", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "backend torch (asked: auto)" in out and "own maps" in out and "all quantities within tolerance" in out
    inject_torch_bug(monkeypatch)
    assert main(argv) == 1
    assert "FAILED: recv_sum" in capsys.readouterr().err
