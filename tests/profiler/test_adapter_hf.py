"""The Hugging Face adapter on small random-weight BERT models (Geneformer is a BertForMaskedLM)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from attnprof import Profiler, UnsupportedAttention
from attnprof.adapters import pick_adapter
from attnprof.adapters.hf import swap_hf
from attnprof.adapters.sdpa import swap_sdpa
from attnprof.kernels.reference import stats_from_probs
from attnprof.recorder import Recorder
from helpers import group_spec

transformers = pytest.importorskip("transformers")

VOCAB, L = 100, 7
LAYERS = ["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"]


def bert(cls=transformers.BertModel, **config):
    torch.manual_seed(0)
    # a wide init so that attention is far from uniform and cells differ
    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        vocab_size=VOCAB, initializer_range=0.2, **config,
    )  # fmt: skip
    return cls(cfg).eval()


def batch():
    """Four cells of different lengths, one with a single real token."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (4, L), generator=g)
    mask = torch.zeros(4, L, dtype=torch.long)
    for b, n in enumerate([7, 4, 1, 6]):
        mask[b, :n] = 1
    return ids, mask, np.array([0, 1, 0, -1])


def output(result):
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def eager_probs(model, ids, mask):
    """The oracle: P of every layer from eager attention with output_attentions=True."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model(ids, attention_mask=mask, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(before)


def mask_form(mask, form):
    """The same key padding as a 2-D mask or as the 4-D forms a caller may pass to a transformers model."""
    keep = mask.bool()[:, None, None, :].expand(-1, 1, L, L)
    if form == "2d":
        return mask
    if form == "4d-bool":
        return keep
    return torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)  # "4d-float", eager-style


@pytest.mark.parametrize(
    "cls, form",
    [
        (transformers.BertModel, "2d"),
        (transformers.BertForMaskedLM, "2d"),
        (transformers.BertModel, "4d-bool"),
        (transformers.BertModel, "4d-float"),
    ],
)
def test_outputs_and_statistics_match_eager_attention(cls, form):
    model = bert(cls)
    prefix = "bert." if cls is transformers.BertForMaskedLM else ""
    ids, mask, groups = batch()
    real = mask.bool()
    with torch.no_grad():
        plain = output(model(ids, attention_mask=mask))
    with Profiler(model, groups=["a", "b"], genes=VOCAB, panel=ids[0, :2].tolist(), window=4, n_context=2) as prof:
        assert prof.layers == [prefix + name for name in LAYERS]
        prof.set_batch(groups=groups, tokens=ids)
        with torch.no_grad():
            out = output(model(ids, attention_mask=mask_form(mask, form)))
    assert model.config._attn_implementation == "sdpa"
    assert (out - plain)[real].abs().max() <= 1e-5

    profile = prof.profile
    assert profile.layers == [prefix + name for name in LAYERS]
    for i, P in enumerate(eager_probs(model, ids, mask)):
        assert not P.masked_select(~real[:, None, None, :]).any()  # the oracle gives padded keys zero
        want = stats_from_probs(P, ~real, torch.as_tensor(groups), ids, group_spec(prof))
        for name, value in want.items():
            np.testing.assert_allclose(profile.group_sums()[name][i], value.numpy(), atol=1e-5, rtol=1e-5, err_msg=name)


@torch.no_grad()
def test_padding_single_token_cell():
    """A cell with one real token: all its mass is on itself, and only position (0, 0) is counted."""
    model = bert()
    ids, mask, _ = batch()
    with Profiler(model, groups=["solo", "rest"], window=4, n_context=1) as prof:
        prof.set_batch(groups=[1, 1, 0, 1], tokens=ids)  # cell 2 has a single real token
        model(ids, attention_mask=mask)
    sums = prof.profile.group_sums()
    count = np.zeros((4, 4))
    count[0, 0] = 1
    for i in range(len(LAYERS)):
        # entropy 0, context mass 1, self mass 1, row max 1
        np.testing.assert_allclose(sums["summary_sum"][i, 0], [[0.0, 1.0, 1.0, 1.0]] * 4, atol=1e-6)
        np.testing.assert_array_equal(sums["pos_count"][i, 0], count)
        np.testing.assert_allclose(sums["pos_sum"][i, 0], count * np.ones((4, 1, 1)), atol=1e-6)


@torch.no_grad()
def test_generic_sdpa_adapter_agrees_on_bert():
    """transformers' own sdpa path through the generic adapter gives the same sums as the hf adapter."""
    model = bert()
    ids, mask, groups = batch()
    sums = []
    for swap in (swap_hf, swap_sdpa):
        recorder = Recorder(["a", "b"], genes=VOCAB, window=4)
        with swap(model, recorder):
            recorder.set_batch(groups=groups, tokens=ids)
            model(ids, attention_mask=mask)
        sums.append(recorder.profile())
    assert sums[0].layers == sums[1].layers == LAYERS
    for name, value in sums[0].sums.items():
        np.testing.assert_allclose(sums[1].sums[name], value, atol=1e-6, err_msg=name)


@torch.no_grad()
def test_implementation_is_restored_also_after_an_exception():
    model = bert()
    model.set_attn_implementation("eager")
    ids, mask, groups = batch()
    plain = model(ids, attention_mask=mask).last_hidden_state
    recorder = Recorder(["a", "b"])
    with pytest.raises(ValueError, match="batch of 4 cells"):  # raised inside the attention call
        with swap_hf(model, recorder):
            assert model.config._attn_implementation == "attnprof"
            recorder.set_batch(groups=[0])
            model(ids, attention_mask=mask)
    assert model.config._attn_implementation == "eager"
    assert torch.equal(model(ids, attention_mask=mask).last_hidden_state, plain)
    with pytest.raises(RuntimeError, match="only inside attnprof's profiling context"):
        model.set_attn_implementation("attnprof")  # the registered function refuses to run unprofiled
        model(ids, attention_mask=mask)


@torch.no_grad()
def test_unsupported_calls_raise_naming_the_layer():
    ids, mask, groups = batch()
    causal = torch.ones(L, L, dtype=torch.bool).tril().expand(4, 1, L, L)
    cases = [
        (bert(), dict(attention_mask=causal), "differs between queries"),
        (bert(is_decoder=True), dict(attention_mask=mask), "causal"),
        (bert(attention_probs_dropout_prob=0.1).train(), dict(attention_mask=mask), "model.eval"),
    ]
    for model, kwargs, why in cases:
        with pytest.raises(UnsupportedAttention, match=rf"'encoder\.layer\.0\.attention\.self': .*{why}"):
            with Profiler(model, groups=["a", "b"]) as prof:
                prof.set_batch(groups=groups)
                model(ids, **kwargs)
        assert model.config._attn_implementation == "sdpa"


def test_pick_adapter():
    assert pick_adapter(bert()) is swap_hf
    assert pick_adapter(bert(transformers.BertForMaskedLM), "sdpa") is swap_sdpa
    with pytest.raises(UnsupportedAttention, match="adapter 'hf' needs a transformers PreTrainedModel"):
        Profiler(torch.nn.Linear(2, 2), groups=["a"], adapter="hf")


def test_without_transformers():
    """attnprof imports without transformers; asking for the hf adapter says how to install it."""
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import torch, attnprof\n"
        "from attnprof.adapters import pick_adapter, swap_sdpa\n"
        "assert pick_adapter(torch.nn.Linear(2, 2)) is swap_sdpa\n"
        "try:\n"
        "    pick_adapter(torch.nn.Linear(2, 2), 'hf')\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert 'pip install "attnprof[hf]"' in run.stdout
