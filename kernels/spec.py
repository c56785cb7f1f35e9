"""The statistics contract shared by every backend.

A backend takes ``q, k, v`` of shape ``[B, H, L, D]``, a key padding mask
``[B, L]`` (True = padding), group codes ``[B]`` (-1 = not counted), optional
token ids ``[B, L]`` and a :class:`StatsSpec`; it returns the attention output
and a dict of float64 *sums* (see :data:`SUM_SHAPES`). Sums merge by addition
across batches, shards and machines.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

#: Largest position window: 16 heads x 2 groups x 8192^2 x 8 bytes x 2 sums is already 34 GB.
MAX_WINDOW = 8192

#: The four per-cell head summaries, in the order of the last axis of ``summary_*``.
SUMMARIES = ("entropy", "context_mass", "self_mass", "row_max")


@dataclass(frozen=True)
class StatsSpec:
    """What to reduce the attention probabilities into.

    n_groups:   number of groups G; group codes are in ``[0, G)`` or -1.
    window:     position window W: the ``[W, W]`` top-left block of P is summed.
    vocab_size: V, the number of token ids; gene-received sums need it and tokens.
    panel:      K token ids whose pairwise attention is summed (unique ids).
    n_context:  C, the number of leading context tokens for ``context_mass``.
    map_bins:   NB, the whole-context maps' bins per axis (0 = no maps). Position i lies in bin
                ``i * NB // map_length``; per cell, head, query bin a and key bin c the map is
                ``m[a, c] = (1 / |R_a|) sum_{i in R_a} sum_{j real, bin(j) = c} P[i, j]`` (R_a: the cell's
                real query rows in bin a), the mean mass a query in bin a puts on keys in bin c (a row
                sums to 1 over the bins). A cell counts for (a, c) when R_a is not empty and bin c holds
                a real key: ``map_sum``, ``map_sq`` (of the per-cell m) and ``map_count``.
    map_length: the fixed length the bins cover: the model's context length, not a batch's (padded
                or trimmed) length, so batches of any length bin alike. A real token at a position
                ``>= map_length`` is refused, not clamped: clamping would pile it into the last bin and
                make that bin mean something else (say the model's context length instead).
    """

    n_groups: int
    window: int = 64
    vocab_size: int | None = None
    panel: tuple[int, ...] = field(default_factory=tuple)
    n_context: int = 0
    map_bins: int = 0
    map_length: int = 0

    def __post_init__(self):
        object.__setattr__(self, "panel", tuple(int(t) for t in self.panel))
        if self.n_groups < 1:
            raise ValueError(f"n_groups must be >= 1, got {self.n_groups}")
        if not 1 <= self.window <= MAX_WINDOW:
            raise ValueError(
                f"window must be in [1, {MAX_WINDOW}], got {self.window}: the position sums take "
                f"groups x heads x window^2 x 8 bytes; W = the context length is the useful maximum"
            )
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {self.vocab_size}")
        if self.n_context < 0:
            raise ValueError(f"n_context must be >= 0, got {self.n_context}")
        if len(set(self.panel)) != len(self.panel):
            raise ValueError(f"panel token ids must be unique, got {list(self.panel)}")
        if self.panel and self.vocab_size is None:
            raise ValueError("a gene-pair panel needs vocab_size (panel entries are token ids)")
        bad = [t for t in self.panel if not 0 <= t < (self.vocab_size or 0)]
        if bad:
            raise ValueError(f"panel token ids {bad} are outside the vocabulary [0, {self.vocab_size})")
        _check_map(self.map_bins, self.map_length)

    @property
    def gene_stats(self) -> bool:
        return self.vocab_size is not None


#: Most map bins per axis: the map sums take groups x heads x bins^2 x 8 bytes x 2 (as the window's).
MAX_MAP_BINS = 1024


def _check_map(bins: int, length: int) -> None:
    if not 0 <= bins <= MAX_MAP_BINS:
        raise ValueError(f"map_bins must be in [0, {MAX_MAP_BINS}] (0 = no whole-context maps), got {bins}")
    if bins == 0:
        if length:
            raise ValueError(f"map_length={length} was given without map_bins: set map_bins > 0 to bin maps")
        return
    if length < bins:
        raise ValueError(
            f"map_bins={bins} needs map_length >= map_bins (every bin at least one position), got map_length="
            f"{length}; map_length is the model's context length (the longest input it takes)"
        )


def sum_shapes(spec: StatsSpec, n_heads: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every sum a backend returns for this spec."""
    G, H, W, C = spec.n_groups, n_heads, spec.window, len(SUMMARIES)
    shapes = {
        "cells": (G,),
        "pos_sum": (G, H, W, W),
        "pos_sq": (G, H, W, W),
        "pos_count": (G, W, W),
        "summary_sum": (G, H, C),
        "summary_sq": (G, H, C),
    }
    if spec.gene_stats:
        V = spec.vocab_size
        shapes.update(recv_sum=(G, H, V), recv_sq=(G, H, V), recv_count=(G, V))
    if spec.panel:
        K = len(spec.panel)
        shapes.update(pair_sum=(G, H, K, K), pair_sq=(G, H, K, K), pair_count=(G, K, K))
    if spec.map_bins:
        NB = spec.map_bins
        shapes.update(map_sum=(G, H, NB, NB), map_sq=(G, H, NB, NB), map_count=(G, NB, NB))
    return shapes


def empty_sums(spec: StatsSpec, n_heads: int, device=None) -> dict[str, torch.Tensor]:
    return {
        name: torch.zeros(shape, dtype=torch.float64, device=device)
        for name, shape in sum_shapes(spec, n_heads).items()
    }


@dataclass
class Inputs:
    """Checked, normalized backend inputs."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    padding: torch.Tensor  # [B, L] bool, True = padding
    groups: torch.Tensor  # [B] int64
    tokens: torch.Tensor | None  # [B, L] int64
    scale: float


SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_inputs(q, k, v, key_padding_mask, groups, tokens, spec: StatsSpec, scale) -> Inputs:
    """Validate shapes, dtypes and ranges; raise ``ValueError`` naming the problem and the fix.

    Non-finite values are not looked for here (that would be a full pass over q, k, v): the
    backends find them in the row log-sum-exp and the output they compute anyway, and then
    :func:`refuse_non_finite` names the culprit.
    """
    scale = check_qkv(q, k, v, scale)
    B, H, L, D = q.shape
    groups = torch.as_tensor(groups, device=q.device)
    if groups.shape != (B,):
        raise ValueError(f"groups must have shape [B] = [{B}], got {tuple(groups.shape)} (mismatched batch sizes?)")
    labelings, padding, tokens = check_batch(spec, groups[None], key_padding_mask, tokens, (B, L), q.device)
    return Inputs(q, k, v, padding, labelings[0], tokens, scale)


def check_qkv(q, k, v, scale) -> float:
    """Shapes and dtypes of q, k, v (no pass over their values); returns the scale."""
    if q.dim() != 4:
        raise ValueError(f"q must have shape [B, H, L, D], got {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must have the same shape [B, H, L, D] (self-attention); "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"q, k, v must share one dtype of float32, float16 or bfloat16; "
            f"got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    B, H, L, D = q.shape
    if B == 0 or L == 0:
        raise ValueError(f"empty batch: q has shape {tuple(q.shape)}; pass at least one cell and one token")
    return float(D**-0.5 if scale is None else scale)


def refuse_non_finite(q, k, v) -> None:
    """Raise the ``ValueError`` naming which of q, k, v holds NaN or Inf (called once a backend has
    found a non-finite row log-sum-exp or output: the full pass happens only on the error path)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not bool(torch.isfinite(x).all()):
            raise ValueError(
                f"{name} contains NaN or Inf: the model's activations are not finite before attention "
                f"(check the inputs and the dtype; fp16 overflows above 65504)"
            )
    raise ValueError("the attention scores overflowed to NaN or Inf: q and k are finite but too large (fp16?)")


def check_batch(spec: StatsSpec, labelings, key_padding_mask, tokens, shape, device):
    """Group codes of every labeling ``[N + 1, B]``, padding ``[B, L]`` and token ids, checked.

    Returns ``(labelings int64, padding bool, tokens int64 or None)`` on ``device``.
    """
    labelings = torch.as_tensor(labelings, device=device)
    device = labelings.device if device is None else device
    if labelings.dim() == 1:
        labelings = labelings[None]
    if shape is None:
        known = key_padding_mask if key_padding_mask is not None else tokens
        if known is None:
            raise ValueError("the batch shape is unknown: pass key_padding_mask or tokens [B, L] (or shape=)")
        shape = tuple(torch.as_tensor(known).shape)
    B, L = shape
    if B == 0 or L == 0:
        raise ValueError(f"empty batch: shape {(B, L)}; pass at least one cell and one token")
    if labelings.dim() != 2 or labelings.shape[1] != B:
        raise ValueError(
            f"group codes must have shape [B] = [{B}] per labeling, got {tuple(labelings.shape)} (mismatched batch sizes?)"
        )
    if labelings.dtype.is_floating_point or labelings.dtype == torch.bool:
        raise ValueError(f"groups must be integer codes in [0, {spec.n_groups}) or -1, got dtype {labelings.dtype}")
    labelings = labelings.long()
    bad = labelings[(labelings < -1) | (labelings >= spec.n_groups)]
    if bad.numel():
        raise ValueError(
            f"group codes {sorted(set(bad.tolist()))} are out of range: codes must be in "
            f"[0, {spec.n_groups}) or -1 (not counted); raise n_groups or fix the labels"
        )
    if key_padding_mask is None:
        padding = torch.zeros(B, L, dtype=torch.bool, device=device)
    else:
        padding = torch.as_tensor(key_padding_mask, device=device)
        if padding.shape != (B, L):
            raise ValueError(f"key_padding_mask must have shape [B, L] = [{B}, {L}], got {tuple(padding.shape)}")
        if padding.dtype != torch.bool:
            raise ValueError(f"key_padding_mask must be bool (True = padding), got {padding.dtype}")
    empty = (padding.all(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"cells {empty[:10]} have no real token (all keys are padding); drop zero-length cells first")
    if spec.map_bins and L > spec.map_length:  # positions past map_length must all be padding
        beyond = (~padding[:, spec.map_length :]).any(1).nonzero().flatten().tolist()
        if beyond:
            last = int((~padding).nonzero()[:, 1].max()) + 1
            raise ValueError(
                f"cells {beyond[:10]} have real tokens at positions >= map_length={spec.map_length}, which no map "
                f"bin covers: set map_length to the model's context length (at least {last} here)"
            )
    if spec.gene_stats:
        if tokens is None:
            raise ValueError("this spec has vocab_size set, so gene statistics need token ids: pass tokens [B, L]")
        tokens = torch.as_tensor(tokens, device=device)
        if tokens.shape != (B, L):
            raise ValueError(f"tokens must have shape [B, L] = [{B}, {L}], got {tuple(tokens.shape)}")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise ValueError(f"tokens must be integer token ids, got dtype {tokens.dtype}")
        tokens = tokens.long()
        real_tokens = tokens[~padding]
        out = real_tokens[(real_tokens < 0) | (real_tokens >= spec.vocab_size)]
        if out.numel():
            raise ValueError(
                f"token ids {sorted(set(out.tolist()))[:10]} are outside the vocabulary [0, {spec.vocab_size}); "
                f"raise vocab_size or fix the tokenizer"
            )
    elif tokens is not None:
        tokens = torch.as_tensor(tokens, device=device).long()
    return labelings, padding, tokens
