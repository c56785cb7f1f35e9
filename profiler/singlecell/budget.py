"""What a run's sums will hold, checked against the machine's memory before the model runs.

Every block holds every sum (:func:`attnprof.kernels.sum_shapes`), so a subset key with many values (a cell id
by mistake) multiplies the memory a run needs; better an error that names the cause than a run killed later.
"""

from __future__ import annotations

import os

import torch

from attnprof.kernels import StatsSpec, sum_shapes

#: Refuse a run whose sums would take more than this share of the machine's memory (the model, the batches
#: and the tables need the rest).
MEMORY_SHARE = 0.5


def attention_shape(model: torch.nn.Module) -> tuple[int, int] | None:
    """(layers, heads) of a model's ``nn.MultiheadAttention`` or Hugging Face attention modules, or None."""
    heads = [m.num_heads for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    if not heads:
        heads = [getattr(m, "num_attention_heads", None) for m in model.modules() if hasattr(m, "attention_head_size")]
        heads = [h for h in heads if h]
    return (len(heads), max(heads)) if heads else None


def sums_bytes(model, n_blocks: int, window: int, n_genes: int, panel: int, map_bins: int = 0) -> int | None:
    """Bytes of float64 sums a run keeps, at most (every attention module counted, also one the forward never
    calls); None when the model's attention shape cannot be read."""
    shape = attention_shape(model)
    if shape is None:
        return None
    layers, heads = shape
    spec = StatsSpec(n_groups=n_blocks, window=window, vocab_size=n_genes, panel=tuple(range(panel)),
                     map_bins=map_bins, map_length=map_bins)  # fmt: skip
    per_layer = sum(int(torch.Size(s).numel()) for s in sum_shapes(spec, heads).values())
    return 8 * layers * per_layer


def check_memory(model, n_blocks: int, window: int, n_genes: int, panel: int, map_bins: int = 0) -> None:
    need = sums_bytes(model, n_blocks, window, n_genes, panel, map_bins)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need is not None and need > MEMORY_SHARE * total:
        raise ValueError(
            f"the run's sums would take {need / 1e9:.1f} GB ({n_blocks} blocks x {need / n_blocks / 1e6:.1f} MB), "
            f"more than half of this machine's {total / 1e9:.0f} GB: fewer blocks (fewer --subset-by keys or values, "
            f"--pseudo-replicates), a smaller --window, --map-bins or panel, or shards on machines with more memory"
        )
