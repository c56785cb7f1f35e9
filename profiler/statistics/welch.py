"""Element-wise group differences with Welch t, from sums, sums of squares and counts.

Two units of replication, one formula: at the **cell** level the replicates are cells (a group's sums are
the sums of its blocks); at the **replicate** level each replicate (animal, donor, sample) contributes the
mean over its cells, and Welch's t compares the replicates' means (pseudobulk practice). The replicate
level is what supports a claim about groups of animals: cells of one animal share its dissection, batch
and section, so treating them as independent makes p-values far too small (Squair et al. 2021).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

#: Replicates per group an element needs at the replicate level (a variance needs two).
MIN_REPLICATES = 2
#: E|X| = sqrt(2/pi)·sigma for X ~ N(0, sigma²): the expected |difference| of an element without effect.
HALF_NORMAL_MEAN = float(np.sqrt(2 / np.pi))


@dataclass
class Contrast:
    """Element-wise statistics of one family, arrays shaped [layers, heads, elements]."""

    mean_a: np.ndarray
    mean_b: np.ndarray
    diff: np.ndarray  # NaN where not valid
    t: np.ndarray  # NaN where not valid or the standard error is zero
    p: np.ndarray  # two-sided Welch p-value (Welch-Satterthwaite degrees of freedom), NaN like t
    n_a: np.ndarray  # [layers, 1 or heads, elements] replicates (cells, at the cell level) behind each element
    n_b: np.ndarray
    valid: np.ndarray  # [layers, 1 or heads, elements]
    se: np.ndarray  # standard error of diff, NaN like diff

    def restricted(self, keep: np.ndarray) -> Contrast:
        """The same statistics with only the elements where ``keep`` ([elements], bool) valid."""
        valid = self.valid & keep

        def masked(x):
            return np.where(valid, x, np.nan)

        return Contrast(self.mean_a, self.mean_b, masked(self.diff), masked(self.t), masked(self.p),
                        self.n_a, self.n_b, valid, masked(self.se))  # fmt: skip

    @property
    def q(self) -> np.ndarray:
        """Benjamini-Hochberg q-values across every layer, head and element of the family."""
        return bh(self.p.ravel()).reshape(self.p.shape)


def welch(sum_a, sq_a, n_a, sum_b, sq_b, n_b, min_cells: int) -> Contrast:
    """Means, difference and Welch t from sums, sums of squares and counts (broadcasting).

    An element is valid where both groups have at least ``max(min_cells, 1)`` replicates (cells, or replicates
    at the replicate level).
    """
    valid = (n_a >= max(min_cells, 1)) & (n_b >= max(min_cells, 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_a, mean_b = sum_a / n_a, sum_b / n_b
        var_a = np.clip(sq_a - n_a * mean_a**2, 0, None) / (n_a - 1)
        var_b = np.clip(sq_b - n_b * mean_b**2, 0, None) / (n_b - 1)
        ea, eb = var_a / n_a, var_b / n_b
        se = np.sqrt(ea + eb)
        diff = np.where(valid, mean_a - mean_b, np.nan)
        t = np.where(valid & (se > 0), diff / se, np.nan)
        dof = (ea + eb) ** 2 / (ea**2 / (n_a - 1) + eb**2 / (n_b - 1))
        p = np.where(np.isnan(t), np.nan, 2 * stats.t.sf(np.abs(t), dof))
    return Contrast(mean_a, mean_b, diff, t, p, n_a, n_b, valid, np.where(valid, se, np.nan))


def cell_contrast(sums, sq, counts, in_a, in_b, min_cells: int) -> Contrast:
    """Welch t with cells as the replicates. ``sums``/``sq``: [..., blocks, heads, elements], ``counts``:
    [..., blocks, 1, elements]; ``in_a``/``in_b``: bool [blocks], the blocks of each group."""
    return welch(sums[..., in_a, :, :].sum(-3), sq[..., in_a, :, :].sum(-3), counts[..., in_a, :, :].sum(-3),
                 sums[..., in_b, :, :].sum(-3), sq[..., in_b, :, :].sum(-3), counts[..., in_b, :, :].sum(-3),
                 min_cells)  # fmt: skip


def replicate_means(sums, counts, min_cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Each block's mean over its cells, 0 where it has fewer than ``min_cells`` cells of the element,
    and that validity as 0/1 (the replicate is then left out of the element)."""
    valid = counts >= max(min_cells, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        means = np.where(valid, sums / np.where(valid, counts, 1), 0.0)
    return means, valid.astype(np.float64)


def replicate_contrast(sums, counts, in_a, in_b, min_cells: int, min_replicates: int = MIN_REPLICATES) -> Contrast:
    """Welch t across replicates: per element, each replicate's mean over its cells (a replicate with fewer
    than ``min_cells`` cells of the element left out), then Welch's test on those means. An element needs
    ``min_replicates`` replicates in each group. Shapes as :func:`cell_contrast`; each block is a replicate."""
    means, valid = replicate_means(sums, counts, min_cells)

    def group(sel):
        m, v = means[..., sel, :, :], valid[..., sel, :, :]
        return (m * v).sum(-3), (m * m * v).sum(-3), v.sum(-3)

    return welch(*group(in_a), *group(in_b), min_replicates)


def bh(p) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values) over all non-NaN entries."""
    p = np.asarray(p, dtype=float)
    q = np.full_like(p, np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        q[ok] = stats.false_discovery_control(p[ok], method="bh")
    return q
