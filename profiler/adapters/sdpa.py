"""Generic adapter: any model whose attention calls ``F.scaled_dot_product_attention``.

Nothing in the model is edited. Forward hooks on every submodule keep the
stack of modules being run, and a ``TorchFunctionMode`` intercepts each
``scaled_dot_product_attention`` call and credits it to the innermost running
module: that module's name is the layer. A call the statistics cannot describe
exactly (causal, an arbitrary float mask, a mask that differs between queries
or heads, cross-attention, dropout, grouped-query attention, inputs that are
not ``[B, H, L, D]``) runs untouched, with one warning per layer that names
it: never a silently wrong number.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .mha import UnsupportedAttention

SUPPORTED = (
    "attnprof profiles torch.nn.MultiheadAttention layers (adapter='mha'), Hugging Face transformers encoders "
    "(adapter='hf') and self-attention calls of torch.nn.functional.scaled_dot_product_attention on [B, H, L, D] "
    "inputs with no mask or a key padding mask (adapter='sdpa')"
)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def key_padding(mask, batch: int, length: int) -> torch.Tensor | None:
    """Bool key padding mask ``[B, L]`` (True = padding) from an attention mask, or None for no mask.

    ``mask`` follows ``scaled_dot_product_attention``: bool with True = attend, or
    float added to the scores, broadcastable to ``[B, H, L, L]``. Raises
    :class:`UnsupportedAttention` saying why when it is not a pure key padding mask.
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise UnsupportedAttention(f"its attention mask is a {type(mask).__name__}, not a tensor")
    if mask.dtype == torch.bool:
        keep = mask
    elif mask.is_floating_point():
        # -inf, or the dtype's minimum that Hugging Face's eager masks use: both give exactly zero probability
        masked = torch.isneginf(mask) | (mask == torch.finfo(mask.dtype).min)
        if not bool(((mask == 0) | masked).all()):
            raise UnsupportedAttention("its float attention mask has values other than 0 and -inf (a score bias)")
        keep = mask == 0
    else:
        raise UnsupportedAttention(f"its attention mask has dtype {mask.dtype}")
    if keep.dim() > 4:
        raise UnsupportedAttention(f"its attention mask has {keep.dim()} dimensions")
    keep = keep.reshape((1,) * (4 - keep.dim()) + tuple(keep.shape))
    if keep.shape[0] not in (1, batch) or keep.shape[2] not in (1, length) or keep.shape[3] not in (1, length):
        raise UnsupportedAttention(
            f"its attention mask of shape {tuple(mask.shape)} does not broadcast to [{batch}, H, {length}, {length}]"
        )
    first = keep[:, :1, :1, :]
    if not bool((keep == first).all()):
        raise UnsupportedAttention("its attention mask differs between queries or heads (it is not a key padding mask)")
    return (~first[:, 0, 0, :]).expand(batch, length).contiguous()


def _sdpa_args(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """The arguments of a ``scaled_dot_product_attention`` call by name, however they were passed."""
    return dict(query=query, key=key, value=value, attn_mask=attn_mask, dropout_p=dropout_p,
                is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)  # fmt: skip


def _why_not(call) -> str | None:
    """Why a call cannot be profiled exactly, or None if it can (mask aside)."""
    q, k, v = call["query"], call["key"], call["value"]
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
        return "its query, key and value are not 4-D [B, H, L, D] tensors"
    if call["is_causal"]:
        return "it is causal (is_causal=True)"
    if call["dropout_p"] > 0:
        return f"it has dropout_p={call['dropout_p']} (call model.eval() before profiling)"
    if call["enable_gqa"]:
        return "it uses grouped-query attention (enable_gqa=True)"
    if not q.shape == k.shape == v.shape:
        return (
            f"query, key and value shapes differ ({tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}): "
            f"cross-attention, grouped-query attention or a different value size"
        )
    if q.dtype not in _DTYPES or not q.dtype == k.dtype == v.dtype:
        return f"its dtypes ({q.dtype}, {k.dtype}, {v.dtype}) are not one of float32, float16, bfloat16"
    return None


class _Intercept(TorchFunctionMode):
    """Hands every ``scaled_dot_product_attention`` call to ``on_sdpa``; everything else runs as is."""

    def __init__(self, on_sdpa):
        super().__init__()
        self.on_sdpa = on_sdpa

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            # the mode is off while this runs, so the backends' own sdpa calls are not intercepted
            return self.on_sdpa(func, args, kwargs)
        return func(*args, **kwargs)


@contextmanager
def swap_sdpa(model: nn.Module, recorder):
    """Profile every ``scaled_dot_product_attention`` call made inside ``model``'s modules.

    Yields the list of profiled layer names, which fills in as layers first
    run (the calls are only seen then). If a whole forward of ``model`` ran and
    not one call could be profiled, raises :class:`UnsupportedAttention`.
    """
    names = {module: name or "<root>" for name, module in model.named_modules()}
    running: list[nn.Module] = []
    profiled: list[str] = []
    passed: dict[str, str] = {}  # layer -> why its calls ran unprofiled (also: warned once)

    def push(module, args):
        running.append(module)

    def pop(module, args, output):  # always_call: runs also when forward raised
        for i in range(len(running) - 1, -1, -1):
            if running[i] is module:
                del running[i]
                break

    def check(module, args, output):
        if not profiled:
            seen = "; ".join(f"{layer!r}: {why}" for layer, why in passed.items())
            raise UnsupportedAttention(
                f"nothing in {type(model).__name__} could be profiled: "
                + (f"its scaled_dot_product_attention calls were all unsupported ({seen}). " if passed
                   else "it made no scaled_dot_product_attention call. ")  # fmt: skip
                + SUPPORTED
            )

    def on_sdpa(func, args, kwargs):
        if not running:  # not inside this model
            return func(*args, **kwargs)
        layer = names[running[-1]]
        call = _sdpa_args(*args, **kwargs)
        why = _why_not(call)
        if why is None:
            q = call["query"]
            try:
                # converted and checked once per forward: the model hands every layer the same mask
                padding = recorder.per_forward(key_padding, call["attn_mask"], q.shape[0], q.shape[2])
            except UnsupportedAttention as e:
                why = str(e)
        if why is not None:
            if layer not in passed:
                passed[layer] = why
                warnings.warn(f"attnprof: layer {layer!r} runs unprofiled: {why}")
            return func(*args, **kwargs)
        if layer not in profiled:
            profiled.append(layer)
        return recorder.attend(layer, q, call["key"], call["value"], key_padding_mask=padding, scale=call["scale"])

    handles = []
    try:
        for module in names:
            handles.append(module.register_forward_pre_hook(push))
            handles.append(module.register_forward_hook(pop, always_call=True))
        handles.append(model.register_forward_hook(check))
        with _Intercept(on_sdpa):
            yield profiled
    finally:
        for handle in handles:
            handle.remove()
