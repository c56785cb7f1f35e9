"""Adapter for ``torch.nn.MultiheadAttention`` (inside ``nn.TransformerEncoder`` etc.).

Each self-attention module gets an instance-level ``forward`` that does the
module's own in-projection, hands ``q, k, v`` to the recorder and applies the
out-projection. The eval-mode C++ fast paths of ``TransformerEncoder`` /
``TransformerEncoderLayer`` / ``MultiheadAttention`` never call
``self_attn.forward``, so they are switched off with
``torch.backends.mha.set_fastpath_enabled(False)`` for the duration. On exit
both are restored exactly: no parameter, buffer or module is replaced.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


class UnsupportedAttention(ValueError):
    """An attention call the profiler cannot profile exactly."""


def find_mha(model: nn.Module) -> list[tuple[str, nn.MultiheadAttention]]:
    return [(name or "<root>", m) for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]


@contextmanager
def fastpath_disabled():
    """Switch off the fused eval-mode paths of the torch transformer modules, restoring the flag after."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


@contextmanager
def swap_mha(model: nn.Module, recorder):
    """Route every ``nn.MultiheadAttention`` of ``model`` through ``recorder.attend``.

    Layers are recorded in the order they first run, so a module that is
    never called (e.g. the prototype layer a ``TransformerEncoder`` was built
    from, kept as an attribute) is not profiled.
    """
    modules = find_mha(model)
    if not modules:
        raise UnsupportedAttention(f"{type(model).__name__} has no torch.nn.MultiheadAttention module to profile")
    saved = []
    try:
        for name, module in modules:
            saved.append((module, module.__dict__.get("forward")))
            module.forward = _profiled_forward(name, module, recorder)
        with fastpath_disabled():
            yield [name for name, _ in modules]
    finally:
        for module, previous in saved:
            if previous is None:
                del module.forward
            else:
                module.forward = previous


def _profiled_forward(name: str, mha: nn.MultiheadAttention, recorder):
    def forward(
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
    ):
        _check_call(name, mha, query, key, value, need_weights, attn_mask, is_causal)
        x = query if mha.batch_first else query.transpose(0, 1)  # [B, L, E]
        B, L, E = x.shape
        H = mha.num_heads
        q, k, v = _in_projection(mha, x)
        q, k, v = (t.view(B, L, H, E // H).transpose(1, 2) for t in (q, k, v))
        try:  # converted and checked once per forward: every layer gets the same mask tensor
            padding = recorder.per_forward(_padding_mask, key_padding_mask, (B, L))
        except UnsupportedAttention as e:
            raise UnsupportedAttention(f"cannot profile attention module {name!r}: {e}") from None
        out = recorder.attend(name, q, k, v, key_padding_mask=padding)
        out = F.linear(out.transpose(1, 2).reshape(B, L, E), mha.out_proj.weight, mha.out_proj.bias)
        return (out if mha.batch_first else out.transpose(0, 1)), None

    return forward


def _check_call(name, mha, query, key, value, need_weights, attn_mask, is_causal):
    def refuse(why, fix):
        raise UnsupportedAttention(f"cannot profile attention module {name!r}: {why}; {fix}")

    if not (query is key and key is value):
        refuse("it is not self-attention (query, key and value differ)", "only self-attention layers can be profiled")
    if attn_mask is not None or is_causal:
        refuse("it has an attn_mask or is causal", "profile encoders with a key padding mask only")
    if need_weights:
        refuse("need_weights=True was asked", "call it with need_weights=False (the profiler computes the statistics)")
    if mha.bias_k is not None or mha.add_zero_attn:
        refuse("bias_k/bias_v or add_zero_attn are set", "these add extra keys the statistics do not define")
    if mha.training and mha.dropout > 0:
        refuse("it is in training mode with dropout", "call model.eval() before profiling")
    if query.dim() != 3:
        refuse(f"the input is unbatched (shape {tuple(query.shape)})", "pass a batch [B, L, E] or [L, B, E]")


def _in_projection(mha: nn.MultiheadAttention, x):
    if mha._qkv_same_embed_dim:
        return F.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
    bias = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
    weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
    return tuple(F.linear(x, w, b) for w, b in zip(weights, bias))


def _padding_mask(mask, shape):
    """Bool key padding mask (True = padding) from the bool or additive float forms."""
    if mask is None:
        return None
    if mask.shape != shape:
        raise UnsupportedAttention(f"its key_padding_mask has shape {tuple(mask.shape)}, expected {shape}")
    if mask.dtype == torch.bool:
        return mask
    padding = torch.isneginf(mask)
    if not bool((padding | (mask == 0)).all()):  # one sync per forward (the recorder keeps the result)
        raise UnsupportedAttention(
            "its float key_padding_mask has values other than 0 and -inf; pass a bool mask (True = padding)"
        )
    return padding
