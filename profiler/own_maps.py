"""A model's own attention maps, where the model can produce them: the ground truth for ``validate``.

- ``torch.nn.MultiheadAttention``: each module is called once more, with the arguments the model
  gave it, plus ``need_weights=True, average_attn_weights=False`` (per-head maps).
- Hugging Face models: the eager attention implementation with ``output_attentions=True``.

Both run the model's regular code, not attnprof's: no profiling, no kernels of ours.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from .adapters.mha import fastpath_disabled, find_mha


def own_maps(model: nn.Module, inputs, each: Callable) -> tuple[str, list] | None:
    """``(how, [each(P, padding) per layer])``: ``each`` gets every layer's maps ``P [B, H, L, L]`` (float32,
    in model order) with the key padding ``[B, L]`` (True = padding) as soon as they exist: for
    ``nn.MultiheadAttention`` only one layer's maps are held at a time (transformers returns every layer's at once).

    None when the model cannot show its maps (neither ``nn.MultiheadAttention`` nor a transformers model).
    """
    if _is_transformers(model):
        return _hf_maps(model, inputs, each)
    if find_mha(model):
        return _mha_maps(model, inputs, each)
    return None


def _run(model, inputs, **extra):
    with torch.inference_mode():
        return model(**inputs, **extra) if isinstance(inputs, dict) else model(*inputs, **extra)


def _mha_maps(model, inputs, each):
    results = []

    def capture(module, args, kwargs, output):
        if kwargs.get("attn_mask") is not None or kwargs.get("is_causal"):
            raise ValueError(f"{type(module).__name__} got an attention mask: only key padding is compared")
        call = {k: v for k, v in kwargs.items() if k not in ("need_weights", "average_attn_weights")}
        # forward, not __call__: the hook must not see its own call
        _, weights = module.forward(*args, **call, need_weights=True, average_attn_weights=False)
        mask = kwargs.get("key_padding_mask", args[3] if len(args) > 3 else None)
        results.append(each(weights.float(), _as_padding(mask, weights)))

    hooks = [m.register_forward_hook(capture, with_kwargs=True) for _, m in find_mha(model)]
    try:
        with fastpath_disabled():  # the fused eval path never calls the module
            _run(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    return "nn.MultiheadAttention(need_weights=True, average_attn_weights=False)", results


def _as_padding(mask, weights: torch.Tensor) -> torch.Tensor:
    """Boolean key padding [B, L] from MultiheadAttention's mask (bool, or float with -inf at padding)."""
    B, _, _, L = weights.shape
    if mask is None:
        return torch.zeros(B, L, dtype=torch.bool)
    return mask.cpu() if mask.dtype == torch.bool else torch.isneginf(mask).cpu()


def _hf_maps(model, inputs, each):
    if not isinstance(inputs, dict):
        raise ValueError("a transformers model's inputs must be a dict (input_ids=..., attention_mask=...)")
    with _eager(model):  # transformers returns every layer's maps at once
        maps = _run(model, inputs, output_attentions=True).attentions
    mask = inputs.get("attention_mask")
    B, _, _, L = maps[0].shape
    padding = torch.zeros(B, L, dtype=torch.bool) if mask is None else (mask == 0).cpu()
    return "transformers eager attention, output_attentions=True", [each(P.float(), padding) for P in maps]


@contextmanager
def _eager(model):
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def _is_transformers(model) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)
