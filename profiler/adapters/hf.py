"""Adapter for Hugging Face ``transformers`` models, through the library's own ``AttentionInterface``.

attnprof registers one attention function under the name ``"attnprof"`` and
:func:`swap_hf` switches the model's attention implementation to it for the
duration, then puts every config's implementation back. A mask function is
registered under the same name too: for an attention name it does not know,
``transformers`` builds no mask at all, and padding would be silently ignored.
It is ``sdpa_mask`` with the causal shortcut off, so the function always gets
``None`` (no padding) or a bool ``[B, 1, L, L]`` mask with True = attend.

``transformers`` is an optional extra: it is imported only when this adapter is used.
"""

from __future__ import annotations

import inspect
import sys
import warnings
from contextlib import contextmanager

from torch import nn

from .mha import UnsupportedAttention
from .sdpa import key_padding

NAME = "attnprof"
INSTALL = 'pip install "attnprof[hf]"'

#: every module of a model being profiled -> (its name in the model, the recorder)
_ACTIVE: dict[nn.Module, tuple[str, object]] = {}

#: keyword arguments of the attention call that change the math beyond plain softmax attention
_REFUSED_KWARGS = ("head_mask", "softcap", "sliding_window", "s_aux", "position_bias")


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"the Hugging Face adapter needs the transformers package: {INSTALL}") from e
    return transformers


def is_hf_model(model) -> bool:
    """Whether ``model`` is a ``transformers.PreTrainedModel``, without importing transformers."""
    modeling = sys.modules.get("transformers.modeling_utils")  # loaded wherever such a model exists
    return modeling is not None and isinstance(model, modeling.PreTrainedModel)


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules, in model order, whose forward dispatches through ``ALL_ATTENTION_FUNCTIONS``."""
    return [(name or "<root>", m) for name, m in model.named_modules() if _uses_interface(type(m))]


def _uses_interface(cls) -> bool:
    code = getattr(inspect.unwrap(cls.forward), "__code__", None)
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names


def check_model(model) -> None:
    """Raise a clear error unless ``model`` is a transformers model this adapter can switch."""
    transformers = _transformers()
    if not isinstance(model, transformers.PreTrainedModel):
        raise UnsupportedAttention(
            f"adapter 'hf' needs a transformers PreTrainedModel, got {type(model).__name__}; "
            f"use adapter='auto', 'mha' or 'sdpa'"
        )
    if not attention_modules(model):
        raise UnsupportedAttention(
            f"{type(model).__name__} has no attention module that dispatches through transformers' "
            f"AttentionInterface; try adapter='sdpa'"
        )


def _mask(*args, **kwargs):
    from transformers.masking_utils import sdpa_mask

    # never None for a causal pattern: a causal layer must show its mask and be refused
    return sdpa_mask(*args, **{**kwargs, "allow_is_causal_skip": False})


def _register() -> None:
    transformers = _transformers()
    transformers.AttentionInterface.register(NAME, profiled_attention)
    transformers.AttentionMaskInterface.register(NAME, _mask)


def _configs(model: nn.Module) -> list:
    """Every config the model's modules hold, with their sub-configs: the attention implementation lives there."""
    from transformers import PreTrainedConfig

    found, todo = {}, [getattr(m, "config", None) for m in model.modules()]
    while todo:
        config = todo.pop()
        if isinstance(config, PreTrainedConfig) and id(config) not in found:
            found[id(config)] = config
            todo.extend(getattr(config, key, None) for key in config.sub_configs)
    return list(found.values())


@contextmanager
def swap_hf(model: nn.Module, recorder):
    """Route the attention of a transformers ``model`` through ``recorder.attend``.

    Yields the attention layer names (module names, in model order). On exit,
    also on an exception, every config's attention implementation is restored.
    """
    check_model(model)
    layers = attention_modules(model)
    names = {m: name or "<root>" for name, m in model.named_modules()}
    if any(m in _ACTIVE for m in names):
        raise RuntimeError(f"{type(model).__name__} is already being profiled: profiling contexts do not nest")
    _register()
    saved = [(config, config._attn_implementation_internal) for config in _configs(model)]
    try:
        model.set_attn_implementation(NAME)
        stuck = [name for name, m in layers if m.config._attn_implementation != NAME]
        if stuck:
            raise UnsupportedAttention(
                f"could not switch the attention implementation of {stuck[:3]} of {type(model).__name__} "
                f"to {NAME!r}; try adapter='sdpa'"
            )
        for name, _ in layers:
            recorder.register(name)
        _ACTIVE.update({m: (name, recorder) for m, name in names.items()})
        yield [name for name, _ in layers]
    finally:
        for m in names:
            _ACTIVE.pop(m, None)
        for config, implementation in saved:
            config._attn_implementation_internal = implementation


def profiled_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """What transformers calls in place of its attention: ``[B, H, L, D]`` in, ``([B, L, H, D], None)`` out."""
    if module not in _ACTIVE:
        raise RuntimeError(f"attn_implementation {NAME!r} runs only inside attnprof's profiling context (Profiler)")
    name, recorder = _ACTIVE[module]

    def refuse(why, fix):
        raise UnsupportedAttention(f"cannot profile attention layer {name!r}: {why}; {fix}")

    if dropout:
        refuse(f"attention dropout is on (p={dropout}, training mode)", "call model.eval() before profiling")
    if kwargs.get("is_causal") or bool(getattr(module, "is_causal", False)):
        refuse("it is causal (a decoder)", "only bidirectional (encoder) attention can be profiled")
    if not query.shape == key.shape == value.shape:
        refuse(
            f"query, key and value shapes differ ({tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)})",
            "only self-attention with as many key as query heads and no key/value cache can be profiled",
        )
    for arg in _REFUSED_KWARGS:
        if kwargs.get(arg) is not None:
            refuse(f"it is called with {arg}", "the statistics are defined for plain softmax attention")
    try:
        # converted and checked once per forward: transformers hands every layer the same mask
        padding, why = recorder.per_forward(key_padding, attention_mask, query.shape[0], query.shape[2]), None
    except UnsupportedAttention as e:
        why = str(e)
    if why is not None:
        refuse(why, "pass a 2-D attention_mask [B, L] (1 = token, 0 = padding) or none")
    if kwargs.get("output_attentions"):
        warnings.warn("attnprof: output_attentions is not available while profiling; the attentions come back empty")
    out = recorder.attend(name, query, key, value, key_padding_mask=padding, scale=scaling)
    return out.transpose(1, 2).contiguous(), None
