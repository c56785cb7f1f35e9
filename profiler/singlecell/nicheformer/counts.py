"""What the count matrix holds, checked in one pass before any cell is tokenized.

The pass refuses NaN or Inf (Nicheformer's own code would silently count
them as 0) and negative values, naming how many cells and genes are
affected. It then decides once how the values are read:

* integer values: raw counts, tokenized as they are;
* non-integer values whose ``expm1`` sums to one constant in every cell:
  ``log1p`` of normalized counts (scanpy's ``normalize_total`` + ``log1p``).
  ``expm1`` recovers exactly the normalized values Nicheformer's ranking
  computes from counts, so they are tokenized, with a one-line warning;
* other non-integer values when the AnnData says it was ``log1p``-transformed
  (``uns["log1p"]``, written by scanpy): refused, since the counts cannot be
  recovered (e.g. log1p of unnormalized counts, or genes subset after
  normalizing);
* other non-integer values: tokenized as they are, with a warning (for
  example volume-normalized MERFISH data, which upstream tokenizes as given).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp


def read_rows(matrix, rows: np.ndarray, chunk_size: int) -> Iterator[tuple[np.ndarray, object]]:
    """``(positions, block)`` for the sorted row positions ``rows``, read ``chunk_size`` rows at a time.

    Each read is a contiguous slice (what backed storage serves fast), then narrowed to the wanted rows.
    """
    for start in range(0, matrix.shape[0], chunk_size):
        stop = min(start + chunk_size, matrix.shape[0])
        lo, hi = np.searchsorted(rows, [start, stop])
        if lo == hi:
            continue  # no wanted cell here: skip the read
        wanted = rows[lo:hi]
        yield wanted, matrix[start:stop][wanted - start]


@dataclass
class _Summary:
    """What one pass over the counts found."""

    n_cells: int = 0
    nonfinite_cells: list = field(default_factory=list)  # row positions
    nonfinite_genes: set = field(default_factory=set)  # column positions
    min_value: float = math.inf
    integer: bool = True
    max_value: float = 0.0
    # sums of expm1 per non-empty cell (float64): their spread tells log1p of normalized data
    expm1_low: float = math.inf
    expm1_high: float = -math.inf
    nonempty: int = 0

    def add(self, positions: np.ndarray, block) -> None:
        self.n_cells += len(positions)
        if sp.issparse(block):
            block = sp.csr_matrix(block)
            data, rows, cols = block.data, np.repeat(np.arange(block.shape[0]), np.diff(block.indptr)), block.indices
        else:
            block = np.asarray(block)
            rows, cols = np.nonzero(block)
            data = block[rows, cols]
        bad = ~np.isfinite(data)
        if bad.any():
            self.nonfinite_cells.extend(np.unique(positions[rows[bad]]).tolist())
            self.nonfinite_genes.update(np.unique(cols[bad]).tolist())
            return  # the run is refused: the rest does not matter
        if data.size == 0:
            return
        self.min_value = min(self.min_value, float(data.min()))
        self.max_value = max(self.max_value, float(data.max()))
        if self.integer and not np.all(data == np.round(data)):
            self.integer = False
        # expm1 sums of every cell (also those read before the first non-integer value)
        with np.errstate(over="ignore"):  # raw counts overflow expm1 (inf): no log1p data looks like that
            sums = np.bincount(rows, weights=np.expm1(data.astype(np.float64)), minlength=block.shape[0])
        sums = sums[np.bincount(rows, minlength=block.shape[0]) > 0]
        if sums.size:
            self.nonempty += sums.size
            self.expm1_low = min(self.expm1_low, float(sums.min()))
            self.expm1_high = max(self.expm1_high, float(sums.max()))


def log1p_tolerance(dtype, max_log: float, n_genes: int) -> float:
    """How far (relative) two cells' ``expm1`` sums of log1p-normalized data may differ from rounding alone.

    Each stored ``y = log1p(x)`` is off by at most u = eps/2 relative (u = 2^-24
    in float32); ``expm1`` turns that into at most ``u * (y + y/x) <= u * (y + 1)``
    relative in x; ``expm1`` and the normalization's own output each round once
    more (2u); a pairwise float sum of the normalization adds at most
    ``log2(n_genes) * u``. Two cells' sums differ by at most twice that bound.
    """
    u = np.finfo(dtype).eps / 2
    return float(2 * u * (max_log + 1 + 2 + math.log2(max(n_genes, 2))))


def inspect_counts(adata, matrix, rows: np.ndarray, chunk_size: int, gene_names) -> str | None:
    """Check the counts of the cells ``rows`` in one pass; return ``"expm1"`` when they are log1p data.

    Raises on NaN/Inf, negative values and log1p data that cannot be inverted, before any work.
    """
    summary = _Summary()
    for positions, block in read_rows(matrix, rows, chunk_size):
        summary.add(positions, block)
    if summary.nonfinite_cells:
        cells, genes = summary.nonfinite_cells, sorted(summary.nonfinite_genes)
        raise ValueError(
            f"the counts hold NaN or Inf values in {len(cells)} of {summary.n_cells} cells and {len(genes)} "
            f"genes (e.g. cell {str(adata.obs_names[cells[0]])!r}, gene {str(gene_names[genes[0]])!r}): "
            f"tokens would silently count them as 0; repair the data (adata.X = np.nan_to_num(adata.X) "
            f"if they stand for no counts) or leave those cells out with subset= (--subset)"
        )
    if summary.min_value < 0:
        raise ValueError(
            f"the count matrix has negative values (min {summary.min_value:.3g}): tokenization needs raw "
            f"counts; pick them with layer= (--layer) or use_raw=True (--use-raw)"
        )
    if summary.integer:
        return None
    dtype = matrix.dtype if np.issubdtype(matrix.dtype, np.floating) else np.float64
    tol = log1p_tolerance(dtype, summary.max_value, matrix.shape[1])
    spread = summary.expm1_high - summary.expm1_low
    if summary.nonempty >= 2 and np.isfinite(summary.expm1_high) and spread <= tol * summary.expm1_high:
        warnings.warn(
            f"the counts are not integers and expm1 of every cell sums to {summary.expm1_high:.6g}: "
            f"they are log1p of normalized counts, so expm1 of them is tokenized (the values Nicheformer "
            f"ranks); pass raw counts with layer= (--layer) or use_raw=True (--use-raw) to use those instead",
            stacklevel=3,
        )
        return "expm1"
    if "log1p" in getattr(adata, "uns", {}):
        raise ValueError(
            "the counts are log1p-transformed (adata.uns['log1p'] is set), but expm1 of them does not sum to "
            "one constant per cell, so the counts cannot be recovered (log1p of unnormalized data, or genes "
            "subset after normalizing): pass raw counts with layer= (--layer) or use_raw=True (--use-raw)"
        )
    warnings.warn(
        "the count matrix has non-integer values and is tokenized as it is (as Nicheformer would, e.g. for "
        "volume-normalized MERFISH); Nicheformer was trained on raw counts: if it holds normalized or "
        "log-transformed data pick the counts with layer= (--layer) or use_raw=True (--use-raw)",
        stacklevel=3,
    )
    return None


def expm1(block):
    """``expm1`` of a block of rows, in its own dtype, sparse or dense."""
    if sp.issparse(block):
        block = sp.csr_matrix(block, copy=True)
        block.data = np.expm1(block.data)
        return block
    return np.expm1(np.asarray(block))
