"""The generic adapter on a hand-written encoder that calls F.scaled_dot_product_attention."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnprof import Profiler, UnsupportedAttention
from attnprof.adapters import pick_adapter
from attnprof.adapters.mha import swap_mha
from attnprof.adapters.sdpa import key_padding, swap_sdpa
from attnprof.kernels.reference import stats_from_probs
from attnprof.recorder import Recorder
from helpers import group_spec

VOCAB, DIM, HEADS, PAD = 50, 32, 4, 0


class SelfAttention(nn.Module):
    """``mode`` picks the attention call: the key padding forms, the unsupported ones, or explicit softmax."""

    def __init__(self, mode: str = "bool"):
        super().__init__()
        self.mode = mode
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.out = nn.Linear(DIM, DIM)
        self.probs = None

    def forward(self, x, keep):  # keep: [B, L] bool, True = token
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        m = self.mode
        if m == "explicit":  # the oracle: materialized softmax
            scores = (q @ k.transpose(-1, -2)) * (DIM // HEADS) ** -0.5
            self.probs = torch.softmax(scores.masked_fill(~keep[:, None, None, :], float("-inf")), dim=-1)
            o = self.probs @ v
        elif m == "bool":
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        elif m == "bool-rows":  # the same key padding repeated for every query and head
            o = F.scaled_dot_product_attention(q, k, v, keep[:, None, None, :].expand(B, HEADS, L, L))
        elif m == "float":
            bias = torch.zeros(B, 1, 1, L).masked_fill(~keep[:, None, None, :], float("-inf"))
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        elif m == "causal":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif m == "bias":  # an arbitrary float mask: a score bias, not padding
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.linspace(-1, 1, L * L).view(L, L))
        elif m == "query-mask":  # padded query rows also masked: not key-only
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, :, None] & keep[:, None, None, :])
        else:
            raise ValueError(m)
        return self.out(o.transpose(1, 2).reshape(B, L, DIM))


class Block(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.attn = SelfAttention(mode)
        self.norm = nn.LayerNorm(DIM)
        self.ff = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.ReLU(), nn.Linear(2 * DIM, DIM))

    def forward(self, x, keep):
        x = self.norm(x + self.attn(x, keep))
        return x + self.ff(x)


class Encoder(nn.Module):
    def __init__(self, modes=("bool", "bool")):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block(m) for m in modes)
        with torch.no_grad():  # sharper attention than the default init, so the statistics differ per cell
            for b in self.blocks:
                b.attn.qkv.weight.mul_(4)

    def forward(self, tokens):
        keep = tokens != PAD
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, keep)
        return x

    def set_mode(self, mode):
        for block in self.blocks:
            block.attn.mode = mode


LAYERS = ["blocks.0.attn", "blocks.1.attn"]


def batch():
    """Four cells of different lengths (one with a single real token), trailing padding."""
    g = torch.Generator().manual_seed(1)
    lengths = [9, 5, 1, 7]
    tokens = torch.randint(1, VOCAB, (4, 9), generator=g)
    for b, n in enumerate(lengths):
        tokens[b, n:] = PAD
    return tokens, np.array([0, 1, 0, -1])


def assert_stats_equal(profile, layer_probs, padding, groups, tokens, spec):
    assert profile.layers == list(layer_probs)
    for i, P in enumerate(layer_probs.values()):
        want = stats_from_probs(P, padding, torch.as_tensor(groups), tokens, spec)
        for name, value in want.items():
            np.testing.assert_allclose(profile.group_sums()[name][i], value.numpy(), atol=1e-5, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("mode", ["bool", "bool-rows", "float"])
def test_outputs_and_statistics_match_materialized_softmax(mode):
    model = Encoder((mode, mode)).eval()
    tokens, groups = batch()
    real = tokens != PAD
    with torch.no_grad():
        plain = model(tokens)
    panel = tokens[0, :2].tolist()
    with Profiler(model, groups=["a", "b"], genes=VOCAB, panel=panel, window=6, n_context=2) as prof:
        prof.set_batch(groups=groups, tokens=tokens)
        with torch.no_grad():
            out = model(tokens)
        assert prof.layers == LAYERS
    assert (out - plain)[real].abs().max() <= 1e-5

    model.set_mode("explicit")
    with torch.no_grad():
        explicit = model(tokens)
    assert (explicit - plain)[real].abs().max() <= 1e-5
    probs = {name: model.get_submodule(name).probs for name in LAYERS}
    assert_stats_equal(prof.profile, probs, ~real, groups, tokens, group_spec(prof))


def test_padding_single_token_cell():
    """A cell with one real token: all its mass is on itself, and only position (0, 0) is counted."""
    model = Encoder().eval()
    tokens, _ = batch()
    with Profiler(model, groups=["solo", "rest"], window=4, n_context=1) as prof:
        prof.set_batch(groups=[1, 1, 0, 1], tokens=tokens)  # cell 2 has a single real token
        with torch.no_grad():
            model(tokens)
    sums = prof.profile.group_sums()
    for i in range(len(LAYERS)):
        np.testing.assert_allclose(sums["summary_sum"][i, 0], [[0.0, 1.0, 1.0, 1.0]] * HEADS, atol=1e-6)
        count = np.zeros((4, 4))
        count[0, 0] = 1
        np.testing.assert_array_equal(sums["pos_count"][i, 0], count)
        np.testing.assert_allclose(sums["pos_sum"][i, 0], count * np.ones((HEADS, 1, 1)), atol=1e-6)


@pytest.mark.parametrize(
    "mode, why", [("causal", "causal"), ("bias", "other than 0 and -inf"), ("query-mask", "differs between queries")]
)
def test_unsupported_calls_pass_through_with_one_warning(mode, why):
    model = Encoder(("bool", mode)).eval()
    tokens, groups = batch()
    with torch.no_grad():
        plain = model(tokens)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Profiler(model, groups=["a", "b"]) as prof:
            outs = []
            for _ in range(2):
                prof.set_batch(groups=groups)
                with torch.no_grad():
                    outs.append(model(tokens))
    ours = [str(w.message) for w in caught if "attnprof" in str(w.message)]
    assert len(ours) == 1, ours  # once per layer, not once per call
    assert "'blocks.1.attn'" in ours[0] and why in ours[0]
    assert prof.profile.layers == ["blocks.0.attn"]
    real = tokens != PAD
    for out in outs:
        assert (out - plain)[real].abs().max() <= 1e-5


def test_nothing_profilable_is_a_clear_error():
    model = Encoder(("causal", "causal")).eval()
    tokens, groups = batch()
    with pytest.warns(UserWarning, match="causal"):
        with pytest.raises(UnsupportedAttention, match=r"nothing in Encoder could be profiled.*causal"):
            with Profiler(model, groups=["a", "b"]) as prof:
                prof.set_batch(groups=groups)
                model(tokens)
    mlp = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(UnsupportedAttention, match="made no scaled_dot_product_attention call"):
        with Profiler(mlp, groups=["a"]) as prof:
            prof.set_batch(groups=[0])
            mlp(torch.ones(1, 4))


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@torch.no_grad()
def test_model_is_restored_also_after_an_exception():
    model = Encoder().eval()
    tokens, groups = batch()
    recorder = Recorder(["a", "b"])
    with swap_sdpa(model, recorder):
        assert _hooks(model) > 0
        recorder.set_batch(groups=groups)
        model(tokens)
    assert _hooks(model) == 0 and torch.overrides._get_current_function_mode_stack() == []

    with pytest.raises(ValueError, match="batch of 4 cells"):  # raised inside the attention call
        with swap_sdpa(model, recorder):
            recorder.set_batch(groups=[0])
            model(tokens)
    assert _hooks(model) == 0 and torch.overrides._get_current_function_mode_stack() == []
    before = {k: v.clone() for k, v in recorder.accumulator.sums("blocks.0.attn").items()}
    model(tokens)  # no longer intercepted: the sums do not move
    assert all(torch.equal(before[k], v) for k, v in recorder.accumulator.sums("blocks.0.attn").items())


@pytest.mark.parametrize(
    "mask, padding",
    [
        (None, None),
        (torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)[:, None, None, :], [[0, 0, 1], [0, 1, 1]]),
        (torch.tensor([[1, 1, 0], [1, 1, 1]]).bool()[:, None, None, :].expand(2, 2, 3, 3), [[0, 0, 1], [0, 0, 0]]),
        (torch.tensor([0.0, float("-inf"), 0.0]), [[0, 1, 0], [0, 1, 0]]),
        (torch.tensor([[0.0, 0.0, torch.finfo(torch.float32).min]] * 2)[:, None, None, :], [[0, 0, 1], [0, 0, 1]]),
    ],
)  # fmt: skip
def test_key_padding_forms(mask, padding):
    got = key_padding(mask, 2, 3)
    assert (got is None) if padding is None else got.tolist() == torch.tensor(padding, dtype=torch.bool).tolist()


@pytest.mark.parametrize(
    "mask, why",
    [
        (torch.ones(3, 3, dtype=torch.bool).tril(), "differs between queries"),
        (torch.tensor([[0.0, 0.5, 0.0]]), "other than 0 and -inf"),
        (torch.ones(2, 1, 1, 4, dtype=torch.bool), "does not broadcast"),
        (torch.ones(2, 1, 1, 3, dtype=torch.int64), "dtype"),
    ],
)
def test_key_padding_refuses(mask, why):
    with pytest.raises(UnsupportedAttention, match=why):
        key_padding(mask, 2, 3)


def test_pick_adapter():
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    mha_model = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
    assert pick_adapter(mha_model) is swap_mha
    assert pick_adapter(Encoder()) is swap_sdpa
    assert pick_adapter(mha_model, "sdpa") is swap_sdpa
    with pytest.raises(UnsupportedAttention, match="no torch.nn.MultiheadAttention"):
        Profiler(Encoder(), groups=["a"], adapter="mha")
    with pytest.raises(ValueError, match="unknown adapter 'flash'"):
        pick_adapter(Encoder(), "flash")
