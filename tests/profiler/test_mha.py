"""Profiling nn.TransformerEncoder through the MultiheadAttention adapter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import attnprof
from attnprof.adapters.mha import fastpath_disabled
from attnprof.kernels.reference import stats_from_probs

D_MODEL, HEADS, VOCAB = 32, 4, 40


def encoder(n_layers=3, batch_first=True, seed=0):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(D_MODEL, HEADS, 64, dropout=0.1, batch_first=batch_first)
    return nn.TransformerEncoder(layer, n_layers).eval()


def batch(B=5, L=23, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, D_MODEL, generator=g)
    padding = torch.zeros(B, L, dtype=torch.bool)
    padding[0, 15:] = True
    padding[2, 1:] = True  # a cell with one real token
    padding[3, 20:] = True
    tokens = torch.randint(0, VOCAB, (B, L), generator=g)
    labels = np.array(["f", "m", "f", "m", "x"])  # "x" is not a profiled group
    return x, padding, tokens, labels


def run(model, x, padding, batch_first=True):
    src = x if batch_first else x.transpose(0, 1)
    out = model(src, src_key_padding_mask=padding)
    return out if batch_first else out.transpose(0, 1)


def profile_model(model, x, padding, tokens, labels, batch_first=True, **options):
    options = {"genes": VOCAB, "window": 8, "panel": [1, 2, 5], "n_context": 2, **options}
    codes = np.where(labels == "x", -1, np.where(labels == "f", 0, 1))
    with attnprof.Profiler(model, groups=["f", "m"], **options) as prof:
        prof.set_batch(groups=codes, tokens=tokens)
        out = run(model, x, padding, batch_first)
    return out, prof.profile


def probs_per_layer(model, x, padding, batch_first=True):
    """Each layer's maps from nn.MultiheadAttention(need_weights=True, average_attn_weights=False)."""
    maps = []

    def capture(layer, args):
        src = args[0]
        _, w = layer.self_attn(src, src, src, key_padding_mask=padding, need_weights=True, average_attn_weights=False)
        maps.append(w)

    hooks = [layer.register_forward_pre_hook(capture) for layer in model.layers]
    try:
        with fastpath_disabled(), torch.no_grad():
            run(model, x, padding, batch_first)
    finally:
        for h in hooks:
            h.remove()
    return maps


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_outputs_unchanged_and_profile_equals_mha_weights(batch_first, mode):
    model = encoder(batch_first=batch_first)
    x, padding, tokens, labels = batch()
    ctx = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    with ctx():
        plain = run(model, x, padding, batch_first)  # eval: takes the fused fast path
        out, profile = profile_model(model, x, padding, tokens, labels, batch_first)
    real = ~padding
    # the fused path zeroes padded positions; real tokens must agree
    assert (out[real] - plain[real]).abs().max() <= 1e-5
    with fastpath_disabled(), ctx():
        regular = run(model, x, padding, batch_first)
    assert (out - regular).abs().max() <= 1e-5

    assert profile.layers == [f"layers.{i}.self_attn" for i in range(3)]
    assert profile.cells == {"f": 2, "m": 2}
    codes = torch.tensor([0, 1, 0, 1, -1])
    maps = probs_per_layer(model, x, padding, batch_first)
    for layer, P in enumerate(maps):
        expected = stats_from_probs(P, padding, codes, tokens, attnprof.StatsSpec(
            n_groups=2, window=8, vocab_size=VOCAB, panel=(1, 2, 5), n_context=2))  # fmt: skip
        for name, value in expected.items():
            np.testing.assert_allclose(profile.group_sums()[name][layer], value.numpy(), atol=1e-5, rtol=1e-5, err_msg=name)
        assert profile.group_sums()["pos_sum"][layer].sum() > 0  # the profiled path really ran


def test_model_is_restored_exactly():
    model = encoder()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    x, padding, tokens, labels = batch()
    assert torch.backends.mha.get_fastpath_enabled()
    with pytest.raises(RuntimeError, match="boom"):
        with attnprof.Profiler(model, groups=["f", "m"]) as prof:
            prof.set_batch(groups=[0, 1, 0, 1, 0])
            run(model, x, padding)
            raise RuntimeError("boom")
    assert torch.backends.mha.get_fastpath_enabled()
    assert dict(model.named_modules()) == modules
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with torch.inference_mode():
        torch.testing.assert_close(run(model, x, padding), run(encoder(), x, padding))


def test_unused_prototype_layer_is_not_profiled():
    model = encoder(n_layers=2)
    model.prototype = nn.TransformerEncoderLayer(D_MODEL, HEADS, 64, batch_first=True)  # never called
    x, padding, tokens, labels = batch()
    with torch.no_grad():
        _, profile = profile_model(model, x, padding, tokens, labels)
    assert profile.layers == ["layers.0.self_attn", "layers.1.self_attn"]


def test_batches_accumulate():
    model = encoder(n_layers=2)
    x, padding, tokens, labels = batch(B=6)
    labels = np.array(["f", "m", "f", "m", "f", "m"])
    with torch.no_grad():
        _, whole = profile_model(model, x, padding, tokens, labels)
        with attnprof.Profiler(model, groups=["f", "m"], genes=VOCAB, window=8, panel=[1, 2, 5], n_context=2) as prof:
            for part in (slice(0, 2), slice(2, 6)):
                prof.set_batch(groups=labels[part], tokens=tokens[part])
                run(model, x[part], padding[part])
    for name, value in whole.group_sums().items():
        np.testing.assert_allclose(prof.profile.group_sums()[name], value, atol=1e-9, rtol=1e-7, err_msg=name)


class CrossAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True)

    def forward(self, x, memory):
        return self.attn(x, memory, memory, need_weights=False)[0]


class Masked(nn.Module):
    def __init__(self, **call):
        super().__init__()
        self.attn = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True)
        self.call = call

    def forward(self, x):
        return self.attn(x, x, x, **self.call)[0]


@pytest.mark.parametrize(
    "model, args, message",
    [
        (CrossAttention(), (torch.randn(2, 5, D_MODEL), torch.randn(2, 7, D_MODEL)), "not self-attention"),
        (Masked(attn_mask=torch.zeros(5, 5), need_weights=False), (torch.randn(2, 5, D_MODEL),), "attn_mask"),
        (
            Masked(attn_mask=torch.triu(torch.ones(5, 5, dtype=torch.bool), 1), is_causal=True, need_weights=False),
            (torch.randn(2, 5, D_MODEL),),
            "causal",
        ),
        (Masked(), (torch.randn(2, 5, D_MODEL),), "need_weights"),
    ],
)
def test_unsupported_attention_names_the_module(model, args, message):
    model.eval()
    with attnprof.Profiler(model, groups=["a", "b"]) as prof:
        prof.set_batch(groups=[0, 1])
        with pytest.raises(attnprof.UnsupportedAttention, match=f"'attn'.*{message}"):
            model(*args)


def test_training_mode_with_dropout_is_refused():
    model = encoder().train()
    x, padding, _, _ = batch()
    with attnprof.Profiler(model, groups=["a"]) as prof:
        prof.set_batch(groups=[0] * 5)
        with pytest.raises(attnprof.UnsupportedAttention, match="model.eval"):
            run(model, x, padding)


def test_forgetting_set_batch_is_an_error():
    model = encoder(n_layers=1)
    x, padding, _, _ = batch()
    with attnprof.Profiler(model, groups=["a", "b"]) as prof, torch.no_grad():
        with pytest.raises(RuntimeError, match="set_batch"):
            run(model, x, padding)
        prof.set_batch(groups=[0, 1, 0, 1, 0])
        run(model, x, padding)
        with pytest.raises(RuntimeError, match="ran twice since the last set_batch"):
            run(model, x, padding)


def test_group_labels_and_batch_size_are_checked():
    model = encoder(n_layers=1)
    x, padding, tokens, _ = batch()
    with attnprof.Profiler(model, groups=["a", "b"], genes=VOCAB) as prof, torch.no_grad():
        with pytest.raises(ValueError, match=r"group labels \['zzz'\]"):
            prof.set_batch(groups=["a", "zzz", "a", "a", "a"], tokens=tokens)
        with pytest.raises(ValueError, match="pass tokens"):
            prof.set_batch(groups=[0, 1, 0, 1, 0])
        prof.set_batch(groups=[0, 1, 0], tokens=tokens)
        with pytest.raises(ValueError, match="3 group codes but layer 'layers.0.self_attn' sees a batch of 5"):
            run(model, x, padding)


def test_model_without_attention_is_refused():
    with pytest.raises(attnprof.UnsupportedAttention, match="Linear"):
        attnprof.Profiler(nn.Linear(3, 3), groups=["a", "b"], adapter="mha")
