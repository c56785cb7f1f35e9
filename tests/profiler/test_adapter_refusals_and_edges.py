"""Tests that kill the mutants mutmut left alive in profiler/adapters/ (``scripts/mutation.sh adapters``):
every refusal of the three adapters alone and with its whole message, and what each accepts at the edges.

- nn.MultiheadAttention (``mha``), through the public Profiler: each refusal, eval-free dropout 0, no
  in-projection bias, float masks, sequence-first layout.
- Hugging Face (``hf``): each refusal of ``profiled_attention`` (dropout, causal by argument and by the
  module's own ``is_causal``, differing shapes, each refused keyword, a mask that is not key padding), called
  as transformers calls it (``ALL_ATTENTION_FUNCTIONS["attnprof"]``) inside a session on a tiny BERT; the
  ``output_attentions`` warning; ``check_model``, nesting and running outside a session.
- SDPA (``sdpa``): each reason of ``_why_not`` in its one warning and in the final "nothing could be
  profiled" refusal, both whole; the supported edges (dropout_p 0, is_causal/enable_gqa False, the three
  dtypes, arguments by position) are profiled without a warning; ``key_padding``'s refusals.

Mutants left alive on purpose, because they are equivalent (unreachable):

- ``mha._in_projection`` with separate q/k/v weights (the two lines after ``if mha._qkv_same_embed_dim``,
  18 mutants: the bias chunking, the weight tuple, the ``zip``). torch sets
  ``_qkv_same_embed_dim = kdim == embed_dim and vdim == embed_dim`` and then packs one ``in_proj_weight``.
  The adapter refuses every call that is not self-attention (``query is key is value``) before projecting,
  and for self-attention the key has ``embed_dim`` features, so a module with ``kdim != embed_dim`` fails in
  its own projection: the separate-weights branch never runs on a call the adapter accepts, and its mutants
  cannot be told apart by any input.
- ``average_attn_weights=True`` -> False in the MHA forward: ``need_weights=True`` is refused, so no
  weights are ever computed or averaged.
- ``is_hf_model``'s ``and`` -> ``or``: its one caller, ``pick_adapter``, also asks for modules that dispatch
  through ``ALL_ATTENTION_FUNCTIONS``, which only transformers models have.
- ``_uses_interface``'s ``getattr(forward, "__code__", None)`` -> no default: every module forward in torch
  and transformers is a Python function with ``__code__``.
- ``getattr(module, "is_causal", False)`` -> default None in ``profiled_attention``: None is falsy.
- ``_mask`` called without ``*args``: transformers calls mask functions with keyword arguments only.
- ``_transformers``' ImportError text: it is checked in a subprocess without transformers
  (``test_adapter_hf.py::test_without_transformers``), which mutmut's switch does not reach.

Not equivalent, and not killed (each needs a model these tests do not build):

- ``_mask``'s ``allow_is_causal_skip=False`` -> True or renamed: it matters only for a causal mask pattern,
  and the causal layers of the models tested are refused first through their ``is_causal``.
- ``profiled_attention``'s ``getattr(module, "is_causal", False)`` -> default True or none: a transformers
  attention module without an ``is_causal`` attribute (BERT's has one).
- ``_configs``' walk of ``sub_configs``: a composite model (vision-text and the like); BERT has none.
- ``_register`` under ``None``: transformers' registry keeps the name registered by an earlier test of the
  same process.
- ``check_model``'s "has no attention module that dispatches through AttentionInterface" message,
  ``pick_adapter``'s ``and`` -> ``or`` and ``attention_modules``' ``"<root>"``: a PreTrainedModel without
  such a module, or one that is itself the attention module.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

import attnprof
from attnprof import UnsupportedAttention

E, H, B, L = 8, 2, 3, 5


def run(mha, *args, **kwargs):
    """Call ``mha`` inside a profiling session; return its output and the profile."""
    with attnprof.Profiler(mha, groups=["a", "b"], window=4) as prof, torch.inference_mode():
        prof.set_batch(groups=[0, 1, 0][: args[0].shape[0 if mha.batch_first else 1]])
        out = mha(*args, **kwargs)
    return out, prof.profile


def refused(message, mha, *args, **kwargs):
    with pytest.raises(UnsupportedAttention, match="^" + re.escape(message) + "$"):
        run(mha, *args, **kwargs)


def mha(**kw):
    torch.manual_seed(0)
    module = nn.MultiheadAttention(E, H, batch_first=True, **kw).eval()
    with torch.no_grad():  # torch initializes the projection biases to 0: make them count
        for bias in (module.in_proj_bias, module.out_proj.bias):
            if bias is not None:
                bias.normal_()
    return module


def test_each_refusal_alone_with_its_whole_message():
    x = torch.randn(B, L, E)
    prefix = "cannot profile attention module '<root>': "
    refused(prefix + "it is not self-attention (query, key and value differ); only self-attention layers can be "
            "profiled", mha(), x, x.clone(), x, need_weights=False)  # fmt: skip
    refused(prefix + "it is not self-attention (query, key and value differ); only self-attention layers can be "
            "profiled", mha(), x, x, x.clone(), need_weights=False)  # fmt: skip
    refused(prefix + "it has an attn_mask or is causal; profile encoders with a key padding mask only",
            mha(), x, x, x, need_weights=False, attn_mask=torch.zeros(L, L, dtype=torch.bool))  # fmt: skip
    refused(prefix + "it has an attn_mask or is causal; profile encoders with a key padding mask only",
            mha(), x, x, x, need_weights=False, is_causal=True,
            attn_mask=None)  # fmt: skip
    refused(prefix + "need_weights=True was asked; call it with need_weights=False (the profiler computes the "
            "statistics)", mha(), x, x, x)  # fmt: skip
    refused(prefix + "bias_k/bias_v or add_zero_attn are set; these add extra keys the statistics do not define",
            mha(add_bias_kv=True), x, x, x, need_weights=False)  # fmt: skip
    refused(prefix + "bias_k/bias_v or add_zero_attn are set; these add extra keys the statistics do not define",
            mha(add_zero_attn=True), x, x, x, need_weights=False)  # fmt: skip
    training = mha(dropout=0.1).train()
    refused(prefix + "it is in training mode with dropout; call model.eval() before profiling",
            training, x, x, x, need_weights=False)  # fmt: skip
    single = torch.randn(L, E)
    refused(prefix + f"the input is unbatched (shape {(L, E)}); pass a batch [B, L, E] or [L, B, E]",
            mha(), single, single, single, need_weights=False)  # fmt: skip


def test_what_it_accepts_gives_the_modules_own_output():
    x = torch.randn(B, L, E)
    padding = torch.zeros(B, L, dtype=torch.bool)
    padding[1, 3:] = True
    for module in (mha(dropout=0.0).train(), mha(bias=False), mha()):  # training without dropout is exact too
        expected, _ = module(x, x, x, key_padding_mask=padding, need_weights=False)
        (out, weights), profile = run(module, x, x, x, key_padding_mask=padding, need_weights=False)
        assert weights is None and profile.cells == {"a": 2, "b": 1}
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # the additive float form of the same mask: 0 for real keys, -inf for padding
    module = mha()
    additive = torch.zeros(B, L).masked_fill(padding, float("-inf"))
    expected, _ = module(x, x, x, key_padding_mask=padding, need_weights=False)
    (out, _), _ = run(module, x, x, x, key_padding_mask=additive, need_weights=False)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    refused("cannot profile attention module '<root>': its float key_padding_mask has values other than 0 and "
            "-inf; pass a bool mask (True = padding)", module, x, x, x,
            key_padding_mask=additive.masked_fill(~padding, -1.0), need_weights=False)  # fmt: skip
    refused(f"cannot profile attention module '<root>': its key_padding_mask has shape {(B, L - 1)}, expected "
            f"{(B, L)}", module, x, x, x,
            key_padding_mask=padding[:, 1:], need_weights=False)  # fmt: skip


def test_sequence_first_modules_are_profiled_in_their_layout():
    torch.manual_seed(0)
    module = nn.MultiheadAttention(E, H).eval()  # [L, B, E]
    x = torch.randn(L, B, E)
    expected, _ = module(x, x, x, need_weights=False)
    (out, _), profile = run(module, x, x, x, need_weights=False)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert profile.cells == {"a": 2, "b": 1} and profile.layers == ["<root>"]



def test_sdpa_masks_become_key_padding_or_are_refused_by_name():
    from attnprof.adapters.sdpa import key_padding

    def refuses(message, mask):
        with pytest.raises(UnsupportedAttention, match="^" + re.escape(message) + "$"):
            key_padding(mask, 2, 3)

    assert key_padding(None, 2, 3) is None
    keep = torch.tensor([[True, True, False], [True, False, False]])
    expected = ~keep
    assert torch.equal(key_padding(keep[:, None, None, :], 2, 3), expected)
    assert torch.equal(key_padding(keep[:, None, None, :].expand(2, 4, 3, 3), 2, 3), expected)
    additive = torch.zeros(2, 1, 1, 3).masked_fill(~keep[:, None, None, :], float("-inf"))
    assert torch.equal(key_padding(additive, 2, 3), expected)
    hf = torch.zeros(2, 1, 1, 3, dtype=torch.float16).masked_fill(~keep[:, None, None, :], torch.finfo(torch.float16).min)
    assert torch.equal(key_padding(hf, 2, 3), expected)
    one_key = key_padding(torch.ones(2, 1, 1, 1, dtype=torch.bool), 2, 3)  # one key column, broadcast
    assert torch.equal(one_key, torch.zeros(2, 3, dtype=torch.bool))
    shared = key_padding(torch.tensor([True, True, False]), 2, 3)  # one row for every cell: broadcast
    assert torch.equal(shared, torch.tensor([[False, False, True]] * 2)) and shared.is_contiguous()
    refuses("its attention mask is a list, not a tensor", [[True]])
    refuses("its float attention mask has values other than 0 and -inf (a score bias)", torch.full((2, 1, 1, 3), -1.0))
    refuses("its attention mask has dtype torch.int64", torch.ones(2, 1, 1, 3, dtype=torch.long))
    refuses("its attention mask has 5 dimensions", torch.ones(1, 2, 1, 1, 3, dtype=torch.bool))
    for shape in ((3, 1, 1, 3), (2, 1, 2, 3), (2, 1, 1, 4)):
        refuses(f"its attention mask of shape {shape} does not broadcast to [2, H, 3, 3]", torch.ones(shape).bool())
    causal = torch.ones(3, 3, dtype=torch.bool).tril()
    refuses("its attention mask differs between queries or heads (it is not a key padding mask)", causal)
    per_head = torch.ones(2, 2, 1, 3, dtype=torch.bool)
    per_head[0, 1, 0, 2] = False
    refuses("its attention mask differs between queries or heads (it is not a key padding mask)", per_head)


# --- Hugging Face adapter: every refusal of ``hf.profiled_attention`` with its whole message -------------

HF_LAYER = "encoder.layer.0.attention.self"


def tiny_bert(**config):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                                  vocab_size=20, **config)  # fmt: skip
    return transformers.BertModel(cfg).eval()


def hf_refused(message, call, **config):
    """``call(attention, module)`` inside a session on a tiny BERT, where ``attention`` is the function
    transformers dispatches to (``ALL_ATTENTION_FUNCTIONS["attnprof"]``), must raise ``message`` exactly."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = tiny_bert(**config)
    module = model.get_submodule(HF_LAYER)
    with attnprof.Profiler(model, groups=["a", "b"]) as prof:
        prof.set_batch(groups=[0, 1])
        with pytest.raises(UnsupportedAttention, match="^" + re.escape(message) + "$"):
            call(ALL_ATTENTION_FUNCTIONS["attnprof"], module)


@torch.no_grad()
def test_hf_refusals_with_their_whole_message():
    q = torch.randn(2, 2, 3, 4)
    prefix = f"cannot profile attention layer {HF_LAYER!r}: "
    hf_refused(prefix + "attention dropout is on (p=0.1, training mode); call model.eval() before profiling",
               lambda f, m: f(m, q, q, q, None, dropout=0.1))  # fmt: skip
    causal = prefix + "it is causal (a decoder); only bidirectional (encoder) attention can be profiled"
    hf_refused(causal, lambda f, m: f(m, q, q, q, None, is_causal=True))
    hf_refused(causal, lambda f, m: f(m, q, q, q, None), is_decoder=True)  # the module's own is_causal
    k = torch.randn(2, 2, 5, 4)
    shapes = (prefix + "query, key and value shapes differ ((2, 2, 3, 4), (2, 2, 5, 4), (2, 2, 5, 4)); only "
              "self-attention with as many key as query heads and no key/value cache can be profiled")  # fmt: skip
    hf_refused(shapes, lambda f, m: f(m, q, k, k, None))
    hf_refused(shapes.replace("(2, 2, 5, 4), (2, 2, 5, 4)", "(2, 2, 3, 4), (2, 2, 5, 4)"),
               lambda f, m: f(m, q, q, k, None))  # value alone differs  # fmt: skip
    for arg in ("head_mask", "softcap", "sliding_window", "s_aux", "position_bias"):
        hf_refused(prefix + f"it is called with {arg}; the statistics are defined for plain softmax attention",
                   lambda f, m: f(m, q, q, q, None, **{arg: 1}))  # fmt: skip
    causal_mask = torch.ones(3, 3, dtype=torch.bool).tril()
    hf_refused(prefix + "its attention mask differs between queries or heads (it is not a key padding mask); "
               "pass a 2-D attention_mask [B, L] (1 = token, 0 = padding) or none",
               lambda f, m: f(m, q, q, q, causal_mask))  # fmt: skip


@torch.no_grad()
def test_hf_accepts_the_edges_and_warns_about_output_attentions():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = tiny_bert()
    module = model.get_submodule(HF_LAYER)
    q = torch.randn(2, 2, 3, 4)
    expected = torch.nn.functional.scaled_dot_product_attention(q, q, q).transpose(1, 2)
    with attnprof.Profiler(model, groups=["a", "b"]) as prof:
        prof.set_batch(groups=[0, 1])
        attention = ALL_ATTENTION_FUNCTIONS["attnprof"]
        # dropout 0, is_causal False and refused arguments passed as None are all plain attention
        out, weights = attention(module, q, q, q, None, dropout=0.0, is_causal=False, head_mask=None, softcap=None)
        assert weights is None
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
        prof.set_batch(groups=[0, 1])
        with pytest.warns(UserWarning) as caught:
            attention(module, q, q, q, None, output_attentions=True)
    assert [str(w.message) for w in caught] == [
        "attnprof: output_attentions is not available while profiling; the attentions come back empty"
    ]
    assert prof.profile.layers == [HF_LAYER]


@torch.no_grad()
def test_hf_passes_the_mask_per_cell_and_the_models_scaling():
    """Three cells, two heads (a batch/head mix-up shows), a key padding mask and a scaling that is not
    1/sqrt(D): the output is sdpa's with the same mask and scale."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = tiny_bert()
    module = model.get_submodule(HF_LAYER)
    q = torch.randn(3, 2, 4, 4)
    keep = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)[:, None, None, :]
    mask = keep.expand(3, 1, 4, 4)
    expected = torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=keep, scale=0.3).transpose(1, 2)
    with attnprof.Profiler(model, groups=["a", "b"]) as prof:
        prof.set_batch(groups=[0, 1, 0])
        out, _ = ALL_ATTENTION_FUNCTIONS["attnprof"](module, q, q, q, mask, scaling=0.3)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_hf_model_checks_with_their_whole_message():
    model = tiny_bert()
    with pytest.raises(UnsupportedAttention, match="^" + re.escape(
            "adapter 'hf' needs a transformers PreTrainedModel, got Linear; use adapter='auto', 'mha' or 'sdpa'")
            + "$"):  # fmt: skip
        attnprof.Profiler(nn.Linear(2, 2), groups=["a"], adapter="hf")
    with attnprof.Profiler(model, groups=["a", "b"]):
        with pytest.raises(RuntimeError, match="^" + re.escape(
                "BertModel is already being profiled: profiling contexts do not nest") + "$"):  # fmt: skip
            with attnprof.Profiler(model, groups=["a", "b"]):
                pass
    model.set_attn_implementation("attnprof")
    with pytest.raises(RuntimeError, match="^" + re.escape(
            "attn_implementation 'attnprof' runs only inside attnprof's profiling context (Profiler)") + "$"):
        model(torch.ones(1, 3, dtype=torch.long))  # fmt: skip


# --- SDPA adapter: every reason of ``sdpa._why_not``, in its warning and in the final refusal ------------


class Call(nn.Module):
    """One layer whose forward is ``F.scaled_dot_product_attention(*make(x))``."""

    def __init__(self, make):
        super().__init__()
        self.make = make

    def forward(self, x):
        args, kwargs = self.make(x)
        return torch.nn.functional.scaled_dot_product_attention(*args, **kwargs)


def sdpa_refused(why, make, x):
    """A model whose only attention call is unsupported warns once naming ``why``, then refuses the run."""
    from attnprof.adapters.sdpa import SUPPORTED

    model = Call(make)
    message = ("nothing in Call could be profiled: its scaled_dot_product_attention calls were all unsupported "
               f"('<root>': {why}). " + SUPPORTED)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UnsupportedAttention, match="^" + re.escape(message) + "$"):
            with attnprof.Profiler(model, groups=["a", "b"], adapter="sdpa") as prof, torch.inference_mode():
                prof.set_batch(groups=[0, 1])
                model(x)
    assert [str(w.message) for w in caught] == [f"attnprof: layer '<root>' runs unprofiled: {why}"]


def test_sdpa_reasons_with_their_whole_message():
    x = torch.randn(2, 2, 3, 4)
    sdpa_refused("its query, key and value are not 4-D [B, H, L, D] tensors",
                 lambda x: ((x[0], x[0], x[0]), {}), x)  # fmt: skip
    sdpa_refused("its query, key and value are not 4-D [B, H, L, D] tensors",
                 lambda x: ((x, x, x[0]), {}), x)  # only the value is 3-D  # fmt: skip
    sdpa_refused("it is causal (is_causal=True)", lambda x: ((x, x, x), {"is_causal": True}), x)
    sdpa_refused("it has dropout_p=0.1 (call model.eval() before profiling)",
                 lambda x: ((x, x, x), {"dropout_p": 0.1}), x)  # fmt: skip
    sdpa_refused("it uses grouped-query attention (enable_gqa=True)", lambda x: ((x, x, x), {"enable_gqa": True}), x)
    longer = torch.randn(2, 2, 5, 4)
    sdpa_refused("query, key and value shapes differ ((2, 2, 3, 4), (2, 2, 5, 4), (2, 2, 5, 4)): cross-attention, "
                 "grouped-query attention or a different value size", lambda x: ((x, longer, longer), {}), x)  # fmt: skip
    sdpa_refused("its dtypes (torch.float64, torch.float64, torch.float64) are not one of float32, float16, bfloat16",
                 lambda x: ((x, x, x), {}), x.double())  # fmt: skip
    sdpa_refused("its float attention mask has values other than 0 and -inf (a score bias)",
                 lambda x: ((x, x, x), {"attn_mask": torch.full((3, 3), -1.0)}), x)  # fmt: skip
    mlp = nn.Sequential(nn.Linear(4, 4))
    from attnprof.adapters.sdpa import SUPPORTED

    with pytest.raises(UnsupportedAttention, match="^" + re.escape(
            "nothing in Sequential could be profiled: it made no scaled_dot_product_attention call. " + SUPPORTED)
            + "$"):  # fmt: skip
        with attnprof.Profiler(mlp, groups=["a"], adapter="sdpa") as prof:
            prof.set_batch(groups=[0])
            mlp(torch.ones(1, 4))


def test_sdpa_profiles_the_supported_edges():
    """dropout_p 0, is_causal False, enable_gqa False, every allowed dtype, arguments by position: profiled."""
    x = torch.randn(2, 2, 3, 4)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        xd = x.to(dtype)
        model = Call(lambda x: ((x, x, x, None, 0.0, False), {"scale": None, "enable_gqa": False}))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with attnprof.Profiler(model, groups=["a", "b"], adapter="sdpa") as prof, torch.inference_mode():
                prof.set_batch(groups=[0, 1])
                out = model(xd)
        expected = torch.nn.functional.scaled_dot_product_attention(xd.float(), xd.float(), xd.float())
        torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
        assert prof.profile.layers == ["<root>"]
    # the call's own scale reaches the kernel
    model = Call(lambda x: ((x, x, x), {"scale": 0.3}))
    with attnprof.Profiler(model, groups=["a", "b"], adapter="sdpa") as prof, torch.inference_mode():
        prof.set_batch(groups=[0, 1])
        out = model(x)
    expected = torch.nn.functional.scaled_dot_product_attention(x, x, x, scale=0.3)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
