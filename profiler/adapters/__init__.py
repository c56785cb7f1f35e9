"""Model adapters: route a model's attention layers through a :class:`Recorder`.

Each adapter is one context manager ``swap(model, recorder)`` that yields the
profiled layer names and restores the model exactly on exit. Adapters hold no
math: they only find ``q, k, v`` and the padding mask and call ``recorder.attend``.
"""

from __future__ import annotations

from .mha import UnsupportedAttention, find_mha, swap_mha

ADAPTERS = {"mha": swap_mha}


def pick_adapter(model, adapter: str = "auto"):
    """The swap function for ``model``: by name, or the first adapter that finds attention layers."""
    if adapter != "auto":
        if adapter not in ADAPTERS:
            raise ValueError(f"unknown adapter {adapter!r}; choose 'auto' or one of {sorted(ADAPTERS)}")
        return ADAPTERS[adapter]
    if find_mha(model):
        return swap_mha
    raise UnsupportedAttention(
        f"found no attention layer attnprof can profile in {type(model).__name__}: "
        f"supported are torch.nn.MultiheadAttention self-attention layers"
    )


__all__ = ["ADAPTERS", "UnsupportedAttention", "pick_adapter"]
