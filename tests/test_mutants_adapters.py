"""Tests that kill the mutants mutmut left alive in profiler/adapters/ (``scripts/mutation.sh adapters``):
every refusal of the nn.MultiheadAttention adapter alone and with its whole message, what it accepts at the
edges (eval-free dropout 0, no in-projection bias, float masks), through the public Profiler only.

Mutants left alive on purpose, because they are equivalent or unreachable:

- ``mha._in_projection`` with separate q/k/v weights (``_qkv_same_embed_dim`` false): torch packs one
  ``in_proj_weight`` whenever ``kdim == vdim == embed_dim``, which self-attention (the only kind profiled)
  requires, so that branch never runs; its mutants cannot be told apart.

Not yet killed (time ran out, not equivalent): the exact wording of the refusals of the Hugging Face adapter
(``hf.profiled_attention``: causal, dropout, cache, extra arguments, masks) and of the SDPA adapter's
``_why_not``, and the ``output_attentions`` warning text; the behaviour (a refusal) is tested, the words are
not yet pinned.
"""

from __future__ import annotations

import re

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
    return nn.MultiheadAttention(E, H, batch_first=True, **kw).eval()


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
