"""Model adapters: route a model's attention layers through a :class:`Recorder`.

Each adapter is one context manager ``swap(model, recorder)`` that yields the
profiled layer names and restores the model exactly on exit. Adapters hold no
math: they only find ``q, k, v`` and the padding mask and call ``recorder.attend``.

- ``mha``:  ``torch.nn.MultiheadAttention`` self-attention (``nn.TransformerEncoder``: Nicheformer, scGPT).
- ``hf``:   Hugging Face ``transformers`` encoders (Geneformer is BERT), via ``AttentionInterface``.
- ``sdpa``: any other model whose attention calls ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

from .hf import attention_modules, check_model, is_hf_model, swap_hf
from .mha import UnsupportedAttention, find_mha, swap_mha
from .sdpa import swap_sdpa

ADAPTERS = {"mha": swap_mha, "hf": swap_hf, "sdpa": swap_sdpa}


def pick_adapter(model, adapter: str = "auto"):
    """The swap function for ``model``: by name, or ``auto``: mha, then hf, then sdpa."""
    if adapter == "auto":
        if find_mha(model):
            return swap_mha
        if is_hf_model(model) and attention_modules(model):
            return swap_hf
        return swap_sdpa  # if no call turns out profilable, the first forward says so
    if adapter not in ADAPTERS:
        raise ValueError(f"unknown adapter {adapter!r}; choose 'auto' or one of {sorted(ADAPTERS)}")
    if adapter == "mha" and not find_mha(model):
        raise UnsupportedAttention(f"adapter 'mha': {type(model).__name__} has no torch.nn.MultiheadAttention module")
    if adapter == "hf":
        check_model(model)
    return ADAPTERS[adapter]


__all__ = ["ADAPTERS", "UnsupportedAttention", "pick_adapter"]
