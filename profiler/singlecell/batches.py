"""Which cells to profile, in which group, and how their tokens (:class:`TokenChunk`) are cut into batches.

Batches cut work two ways. Cells are bucketed by length (sorted within
buckets of a few thousand cells), and each batch's trailing padding is
trimmed to its longest real cell. Trimming never changes a real token's
output or any statistic: padded keys are masked and positions are absolute.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..checks import SHOWN, describe_groups
from .vocab import PAD


@dataclass
class TokenChunk:
    """Tokens of some cells: their row positions in the AnnData, tokens ``[n, width]``, lengths."""

    rows: np.ndarray
    tokens: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class CellSelection:
    """The cells to profile: row positions in the AnnData (sorted) and their group codes."""

    rows: np.ndarray
    codes: np.ndarray
    groups: list[str]

    def __len__(self) -> int:
        return len(self.rows)

    def counts(self) -> dict[str, int]:
        return {g: int(n) for g, n in zip(self.groups, np.bincount(self.codes, minlength=len(self.groups)))}

    def codes_for(self, rows: np.ndarray) -> np.ndarray:
        """Group codes of selected cells given by row position."""
        return self.codes[np.searchsorted(self.rows, rows)]

    def head(self, n: int) -> CellSelection:
        """The first ``n`` selected cells."""
        return CellSelection(self.rows[:n], self.codes[:n], self.groups)


def select_cells(
    obs: pd.DataFrame,
    groupby: str | None,
    *,
    groups: Sequence[str] | None = None,
    subset: str | None = None,
    min_groups: int = 2,
) -> CellSelection:
    """Cells of ``obs`` to profile, grouped by the column ``groupby``.

    groups:     group names to keep, in this order (default: the column's
                categories, or its sorted values, that have cells).
    subset:     a ``DataFrame.query``-style expression on obs, e.g. ``"cell_type == 'neuron'"``.
    min_groups: fewer groups with cells is an error (a contrast needs two).
    ``groupby=None`` puts every cell in one group, ``"all"``.
    Cells without a label (NaN) are left out with a warning that says how many.
    """
    if groupby is None:
        rows = np.flatnonzero(_subset_mask(obs, subset))
        return CellSelection(rows=rows, codes=np.zeros(len(rows), dtype=np.int64), groups=["all"])
    if groupby not in obs.columns:
        close = difflib.get_close_matches(groupby, [str(c) for c in obs.columns], n=3)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"obs has no column {groupby!r} to group by{hint} (columns: {list(obs.columns)})")
    keep = _subset_mask(obs, subset)
    labels = obs[groupby]
    unlabeled = keep & labels.isna().to_numpy()
    if unlabeled.any():
        warnings.warn(
            f"{int(unlabeled.sum())} of {int(keep.sum())} cells have no {groupby!r} label (NaN) and are left out",
            stacklevel=2,
        )
        keep &= ~unlabeled
    names = _label_names(labels)
    seen = set(names[keep].tolist())
    present = [g for g in ordered_values(labels) if g in seen]
    if groups is None:
        groups = present
    else:
        groups = [str(g) for g in groups]
        absent = [g for g in groups if g not in present]
        if absent:
            raise ValueError(
                f"group(s) {absent[:SHOWN]} have no cells in obs[{groupby!r}]{' within the subset' if subset else ''}; "
                f"with cells: {describe_groups(present, obs[groupby])}"
            )
        if len(set(groups)) != len(groups):
            raise ValueError(f"groups must be unique, got {groups}")
    if len(groups) < min_groups:
        where = " within the subset" if subset else ""
        raise ValueError(
            f"obs[{groupby!r}] has {len(groups)} {'group' if len(groups) == 1 else 'groups'} with cells "
            f"({groups}){where}: a contrast needs two; group by another column or widen the subset"
        )
    index = {g: i for i, g in enumerate(groups)}
    codes = np.array([index.get(x, -1) for x in names], dtype=np.int64)
    codes[~keep] = -1
    rows = np.flatnonzero(codes >= 0)
    return CellSelection(rows=rows, codes=codes[rows], groups=list(groups))


def _subset_mask(obs: pd.DataFrame, subset: str | None) -> np.ndarray:
    if subset is None:
        return np.ones(len(obs), dtype=bool)
    try:
        mask = obs.eval(subset)
    except Exception as e:  # pandas raises many kinds (UndefinedVariableError, SyntaxError, TypeError, ...)
        raise ValueError(
            f"cannot evaluate the subset {subset!r} on obs: {type(e).__name__}: {e}; "
            f"write a pandas query such as \"cell_type == 'neuron'\" over the columns {list(obs.columns)}"
        ) from e
    mask = np.asarray(mask)
    if mask.dtype != bool or mask.shape != (len(obs),):
        raise ValueError(f"the subset {subset!r} must give one True/False per cell, got {mask.dtype} {mask.shape}")
    if not mask.any():
        raise ValueError(f"the subset {subset!r} selects no cells (of {len(obs)}): check the expression and values")
    return mask


def _label_names(labels: pd.Series) -> np.ndarray:
    return np.array([str(x) for x in labels.astype(object)], dtype=object)


def ordered_values(labels: pd.Series) -> list[str]:
    """Category order for categoricals, else the sorted distinct values."""
    if isinstance(labels.dtype, pd.CategoricalDtype):
        return [str(c) for c in labels.cat.categories]
    return [str(v) for v in sorted(labels.dropna().unique())]


# ------------------------------------------------------------------ batches
@dataclass
class Batch:
    """One forward pass: row positions, token ids ``[B, L]`` and group codes ``[B]``."""

    rows: np.ndarray
    tokens: torch.Tensor
    codes: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)


def make_batches(
    chunks: Iterable[TokenChunk],
    codes_of,
    *,
    batch_size: int = 32,
    bucket_size: int = 2048,
    trim: bool = True,
    pad_to: int | None = None,
) -> Iterator[Batch]:
    """Bucket cells by length and cut batches; ``trim`` cuts each batch to its longest cell.

    codes_of: maps row positions to group codes.
    pad_to:   the width of untrimmed batches (the model's context length).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not trim and pad_to is None:
        raise ValueError("untrimmed batches need pad_to= (the context length)")
    bucket: list[TokenChunk] = []
    held = 0
    for chunk in chunks:
        bucket.append(chunk)
        held += len(chunk)
        if held >= bucket_size:
            yield from _cut(_concat(bucket), codes_of, batch_size, trim, pad_to)
            bucket, held = [], 0
    if bucket:
        yield from _cut(_concat(bucket), codes_of, batch_size, trim, pad_to)


def _concat(chunks: list[TokenChunk]) -> TokenChunk:
    width = max(c.tokens.shape[1] for c in chunks)
    tokens = np.full((sum(len(c) for c in chunks), width), PAD, dtype=np.int64)
    at = 0
    for c in chunks:
        tokens[at : at + len(c), : c.tokens.shape[1]] = c.tokens
        at += len(c)
    return TokenChunk(np.concatenate([c.rows for c in chunks]), tokens, np.concatenate([c.lengths for c in chunks]))


def _cut(chunk: TokenChunk, codes_of, batch_size: int, trim: bool, pad_to: int | None) -> Iterator[Batch]:
    order = np.argsort(-chunk.lengths, kind="stable")  # longest first, so a batch's cells are alike
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = int(chunk.lengths[idx].max()) if trim else pad_to
        tokens = np.full((len(idx), width), PAD, dtype=np.int64)
        n = min(width, chunk.tokens.shape[1])
        tokens[:, :n] = chunk.tokens[idx, :n]
        rows = chunk.rows[idx]
        yield Batch(rows=rows, tokens=torch.from_numpy(tokens), codes=codes_of(rows))
