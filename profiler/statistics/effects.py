"""Effect sizes of a head that mean the same at any number of replicates.

Mean |D| is biased upward by noise: with no true difference each element's |D| is about sqrt(2/pi)·SE, so
mean |D| falls as replicates grow and, for a fixed true effect, its excess over the noise floor grows like
sqrt(n). E[D²] = δ² + Var(D), and SE² (from unbiased sample variances) is unbiased for Var(D), so
mean(D² − SE²) over a head's elements estimates the mean squared true difference without bias.
"""

from __future__ import annotations

import numpy as np


def mean_square_diff(diff: np.ndarray, se: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unbiased mean squared difference over the last axis, mean(D² − SE²), and its root clipped at 0.

    Elements with NaN ``diff`` or ``se`` are left out; a row without elements gives NaN.
    """
    ok = np.isfinite(diff) & np.isfinite(se)
    n = ok.sum(-1)
    total = np.where(ok, diff**2 - se**2, 0.0).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        msd = np.where(n > 0, total / np.maximum(n, 1), np.nan)
    return msd, np.sqrt(np.clip(msd, 0, None))
