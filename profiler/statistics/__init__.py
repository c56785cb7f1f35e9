"""Pure statistics on a profile's sums: numpy and scipy only (no torch, no pandas frames).

- :mod:`.welch`: element-wise differences with Welch t, at the cell or the replicate level, and BH q-values.
- :mod:`.relabel`: relabelings of whole replicates within strata (exact enumeration or Monte Carlo).
- :mod:`.null`: each head's mean |D| and max |D| under every relabeling, from the block sums.
- :mod:`.multiplicity`: permutation p-values and the Westfall–Young family-wise adjustment.
- :mod:`.effects`: effect sizes that mean the same at any n.
"""

from .effects import mean_square_diff
from .multiplicity import permutation_p, westfall_young
from .null import head_null
from .relabel import Relabelings, relabelings
from .welch import HALF_NORMAL_MEAN, Contrast, bh, cell_contrast, replicate_contrast, welch

__all__ = [
    "HALF_NORMAL_MEAN",
    "Contrast",
    "Relabelings",
    "bh",
    "cell_contrast",
    "head_null",
    "mean_square_diff",
    "permutation_p",
    "relabelings",
    "replicate_contrast",
    "welch",
    "westfall_young",
]
