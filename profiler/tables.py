"""Difference tables of one group against another, from a Profile's block sums.

For a contrast (a, b) every element (a position pair, a gene, a gene pair, a head summary) gets
``D = mean_a - mean_b`` and a Welch t **at the unit of replication**: with replicates (animals, donors),
each replicate's mean over its cells, compared across replicates; without, cells as replicates (said in
``Comparison.unit``). Heads and layers are then summarized as in the Nicheformer paper: per layer, the
mean over heads of the mean |D| ("average attention difference") and the max over heads of the max |D|
("maximum attention difference"; its other reading, the max over heads of the mean |D|, stands beside it).

Every summary is set against chance. Beside mean |D| stand its noise floor (sqrt(2/pi)·SE averaged the
same way) and an unbiased estimate of the mean squared difference, mean(D² − SE²), with its root: unlike
mean |D| it does not grow with the number of replicates for a fixed effect. The permutation null relabels
whole blocks (replicates, within strata; pseudo-replicates of cells without a replicate key) from the
block sums at compare time: exact enumeration when the design allows few relabelings, Monte Carlo
otherwise. Heads and layers carry the null mean, its 95th percentile, the excess, the permutation p and a
Westfall–Young family-wise adjusted p across all layers x heads (or layers) of a family.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .special_tokens import looks_special, special_token_mask
from .statistics import (
    HALF_NORMAL_MEAN, Contrast, bh, cell_contrast, head_null, permutation_p, relabelings,
    replicate_contrast, welch, westfall_young,
)  # fmt: skip
from .frames import element_table, heads_table, layers_table, summaries_table, to_anndata
from .statistics.welch import MIN_REPLICATES, replicate_means
from .views import check_crossed

if TYPE_CHECKING:  # the profile holds sums, the comparison reads them: no import at run time
    from .profile import Profile

__all__ = ["Comparison", "Contrast", "bh", "compare", "welch", "HALF_NORMAL_MEAN"]

FAMILIES = ("position", "gene", "pair")
#: Gene-set families are named ``set:<name>``: the gene family restricted to the set's genes.
SET = "set:"
PREFIX = {"position": "pos", "gene": "recv", "pair": "pair"}
#: Cells an element needs by default, per group at the cell level and per replicate at the replicate level:
#: below ~10 a mean over cells (and a variance) is unreliable, and a token seen in one or two cells tops
#: the tables by chance.
DEFAULT_MIN_CELLS = 10
#: Relabelings for the permutation null: p resolves to 1/(1 + 999) = 0.001. They cost nothing in the forward
#: pass (the null is computed at compare time from the block sums): about 2 s per layer of 16 heads over
#: 10,000 genes and 12 replicates here.
DEFAULT_PERMUTATIONS = 999
#: More relabelings only cost time (about 1 s per 1,000 per layer of 16 heads over 10,000 genes here):
#: p resolves to 1e-5 at this many.
MAX_PERMUTATIONS = 100_000
STATS = ("mean_abs_diff", "max_abs_diff")
#: The layers table's other reading of "maximum difference": the max over heads of each head's mean |D|.
LAYER_MAX_OF_MEAN = "max_head_mean_abs_diff"


def is_special_token(name) -> bool:
    """Context and special tokens (``<species:mouse>``, ``<pad>``, ``[CLS]``): never listed among genes."""
    return looks_special(name)  # the fallback of profiles that do not record their special token ids


class Comparison:
    """All difference tables of group ``a`` minus group ``b``.

    unit:      ``"replicate"`` when the profile's blocks are replicates (animals, donors): D, t and p
               compare the replicates' means; ``"cell"`` without a replicate key: cells are treated as
               independent replicates (pass ``unit="cell"`` to get that view of a replicate profile too).
    heads:     one row per layer, head and family (position, gene, pair, and ``set:<name>`` per gene set:
               the gene family restricted to the set's genes).
    within:    the subset compared in (``{"cell_type": "HY GABA"}``; empty: all cells); ``profile`` is then the
               profile's view (:meth:`attnprof.Profile.view`), whose blocks add up each replicate's cells.
    layers:    one row per layer and family: mean over heads of mean |D|, max over heads of max |D| and
               ``max_head_mean_abs_diff`` (max over heads of mean |D|).
    genes:     one row per layer, head and gene valid in both groups, most significant first (Welch p, then
               |t|); context and special tokens are not genes.
    context:   the same for the context and special tokens (``<species:mouse>``, ...).
    pairs:     one row per layer, head and panel gene pair, likewise.
    summaries: one row per layer, head and head summary (entropy, context, self, row max).

    Element rows carry Welch t, p, Benjamini-Hochberg q (across all layers, heads and elements of the
    table) and the replicates (``n_a``, ``n_b``) and cells (``cells_a``, ``cells_b``) behind them; at the
    replicate level also the cell-level ``t_cells`` and ``p_cells`` (cells as independent replicates:
    shown, not to be read as findings) and ``left_out``, the replicates holding the element in fewer than
    ``min_cells`` cells. The heads and layers tables carry ``noise_floor``, ``excess_over_noise``,
    ``mean_sq_diff`` (mean of D² − SE²: unbiased for the mean squared true difference) and ``rms_diff`` (its
    root, clipped at 0), ``max_abs_t`` with the element that holds it, and, with permutations, per
    statistic (``mean_abs_diff``, ``max_abs_diff``): ``<stat>_null_mean``, ``<stat>_null_q95``,
    ``<stat>_excess``, ``p_perm_<stat>`` and ``p_fwer_<stat>`` (Westfall–Young, across all layers x heads
    of the family; for layers, across layers, and also for ``max_head_mean_abs_diff``). Gene and context rows
    also carry ``token_id``.
    """

    def __init__(self, profile: Profile, a, b, min_cells: int | None = None, permutations: int | None = None, *,
                 seed: int = 0, unit: str | None = None, min_replicates: int = MIN_REPLICATES, within=None,
                 by: str | None = None, gene_sets=None):  # fmt: skip
        self.within = {str(k): str(v) for k, v in (within or {}).items()}
        self.gene_sets = _gene_sets(profile, gene_sets)
        profile = profile.view(by or contrast_key(profile, a, b), self.within)  # blocks of one replicate added up
        self.profile = profile
        ia, ib = profile.group_index(a), profile.group_index(b)
        if ia == ib:
            raise ValueError(f"compare needs two different groups, got {a!r} twice")
        min_cells = DEFAULT_MIN_CELLS if min_cells is None else int(min_cells)
        if min_cells < 0:
            raise ValueError(f"min_cells must be >= 0 (0 and 1 both mean: any cell), got {min_cells}")
        permutations = DEFAULT_PERMUTATIONS if permutations is None else int(permutations)
        if not 0 <= permutations <= MAX_PERMUTATIONS:  # before any work
            raise ValueError(f"permutations must be >= 0 (0: no permutation null) and at most {MAX_PERMUTATIONS:,} "
                             f"(p resolves to 1/(1 + N)), got {permutations}")  # fmt: skip
        self.a, self.b, self.min_cells, self.min_replicates = profile.groups[ia], profile.groups[ib], min_cells, int(min_replicates)
        cells = profile.cells
        empty = [g for g in (self.a, self.b) if cells[g] == 0]
        if empty:
            raise ValueError(f"group(s) {empty} have zero cells in this profile; cells per group: {cells}")
        blocks = profile.blocks
        self.unit = unit or ("cell" if blocks.pseudo else "replicate")
        if self.unit not in ("cell", "replicate"):
            raise ValueError(f"unit must be 'replicate' or 'cell', got {self.unit!r}")
        if self.unit == "replicate" and blocks.pseudo:
            raise ValueError("unit='replicate' needs a profile with replicates (profile with a replicate key, "
                             "e.g. attnprof run --replicate animal)")  # fmt: skip
        if self.unit == "replicate":
            check_crossed(profile, ia, ib)
        held = profile.sums["cells"][0] > 0
        # the units: blocks of a or b that hold cells; a test relabels them
        self._units = (blocks.of_group(ia) | blocks.of_group(ib)) & held
        self._in_a = blocks.of_group(ia)[self._units]
        self.replicates = {self.a: int(self._in_a.sum()), self.b: int((~self._in_a).sum())}
        self.permutations, self.relabelings = permutations, None
        if permutations:
            strata = None if blocks.strata is None else np.asarray(blocks.strata)[self._units]
            self.relabelings = relabelings(self._in_a, strata, permutations, seed)
            self.permutations = self.relabelings.n
        genes = "recv_sum" in profile.sums and profile.genes is not None
        self._special = special_token_mask(profile) if genes else None  # by the recorded ids (names: old profiles)
        self.contrasts, self.cell_contrasts, self.left_out, nulls = {}, {}, {}, {}
        for family in self._families():
            self.contrasts[family], self.cell_contrasts[family], self.left_out[family], nulls[family] = \
                self.contrast_of(family)  # fmt: skip
        self.token_contrast = None  # context and special tokens, apart from the genes
        if "gene" in self.contrasts and profile.genes is not None:
            special = self._special
            self.token_contrast = self.contrasts["gene"].restricted(special)
            self.contrasts["gene"] = self.contrasts["gene"].restricted(~special)
            self.cell_tokens = self.cell_contrasts["gene"].restricted(special)
            self.cell_contrasts["gene"] = self.cell_contrasts["gene"].restricted(~special)
        self.heads = heads_table(self)
        self.layers = layers_table(self)
        if self.relabelings is not None:
            self._add_permutation_null(nulls)
        self.genes = element_table(self, "gene")
        self.context = element_table(self, "context")
        self.pairs = element_table(self, "pair")
        self.summaries = summaries_table(self)

    # ------------------------------------------------------------ design
    @property
    def exact(self) -> bool:
        """The permutation null enumerates every distinct relabeling (an exact test)."""
        return bool(self.relabelings is not None and self.relabelings.exact)

    @property
    def min_p(self) -> float | None:
        """The smallest permutation p of mean |D| or max |D| this design and these permutations allow (None
        without any): 1 / (1 + N), or 2 / (1 + N) when every relabeling, the observed one's mirror image among
        them, is enumerated."""
        return None if self.relabelings is None else self.relabelings.min_p

    def design(self) -> str:
        """One line on the unit of replication and what the permutation null can resolve."""
        if self.unit == "cell":
            pseudo = self.profile.blocks.pseudo
            kind = "pseudo-replicate blocks of cells" if pseudo else "replicates"
            line = (f"cells treated as independent replicates{' (no replicate key)' if pseudo else ''}: "
                    f"{self.profile.cells[self.a]} vs "
                    f"{self.profile.cells[self.b]} cells; the null relabels {self.replicates[self.a]} vs "
                    f"{self.replicates[self.b]} {kind}")  # fmt: skip
        else:
            line = (f"replicate level: {self.replicates[self.a]} {self.a} vs {self.replicates[self.b]} {self.b} "
                    f"replicates ({self.profile.cells[self.a]} vs {self.profile.cells[self.b]} cells)")
            if self.profile.blocks.strata is not None:
                line += ", relabeled within strata"
        if self.within:
            line += " within " + ", ".join(f"{k} = {v}" for k, v in self.within.items())
        if self.relabelings is None:
            return line + "; no permutations"
        how = (f"all {self.relabelings.distinct} distinct relabelings (exact)" if self.exact
               else f"{self.permutations} random relabelings of {self.relabelings.distinct} possible")  # fmt: skip
        mirror = " (its mirror image, the groups swapped, ties it)" if self.relabelings.mirrored else ""
        return line + f"; {how}: smallest possible p = {self.min_p:.3g}{mirror}"

    # ------------------------------------------------------------ statistics
    def _families(self):
        present = {"position": "pos_sum", "gene": "recv_sum", "pair": "pair_sum"}
        sets = [f"{SET}{name}" for name in self.gene_sets] if "recv_sum" in self.profile.sums else []
        return [f for f in FAMILIES if present[f] in self.profile.sums] + sets

    def _unit_arrays(self, family: str, layer: int):
        """One layer's sums, squares [units, heads, elements] and counts [units, 1, elements]."""
        s, nh, units = self.profile.sums, self.profile.n_heads, self._units
        if family == "summary":
            total, sq = s["summary_sum"][layer][units], s["summary_sq"][layer][units]
            counts = np.broadcast_to(s["cells"][layer][units][:, None, None], (len(total), 1, total.shape[-1]))
            return total, sq, counts
        if family.startswith(SET):  # a gene set: the gene family restricted to the set's genes
            genes = self.gene_sets[family[len(SET):]]
            return tuple(x[..., genes] for x in self._unit_arrays("gene", layer))
        p = PREFIX[family]
        n = int(units.sum())
        return (s[f"{p}_sum"][layer][units].reshape(n, nh, -1), s[f"{p}_sq"][layer][units].reshape(n, nh, -1),
                s[f"{p}_count"][layer][units].reshape(n, 1, -1))  # fmt: skip

    def contrast_of(self, family: str):
        """The family's contrast at the comparison's unit, at the cell level, the left-out replicates
        [layers, 1, elements], and with permutations every head's mean |D| and max |D| under every relabeling
        ([1 + N, layers, heads] each; else None): layer by layer, each layer's block arrays gathered once (a
        whole vocabulary's are large)."""
        in_a, in_b = self._in_a, ~self._in_a
        layers = range(len(self.profile.layers))
        unit, cell, left = [], [], []
        null = None  # the head summaries are tested element by element only
        if self.relabelings is not None and family != "summary":
            null = np.full((2, len(self.relabelings.in_a), len(layers), self.profile.n_heads), np.nan)
        keep = ~self._special if family == "gene" else None
        for layer in layers:
            total, sq, counts = self._unit_arrays(family, layer)
            cell.append(cell_contrast(total, sq, counts, in_a, in_b, self.min_cells))
            if self.unit == "replicate":
                unit.append(replicate_contrast(total, counts, in_a, in_b, self.min_cells, self.min_replicates))
                left.append(((counts > 0) & (counts < self.min_cells)).sum(0))
                X, V, threshold = *replicate_means(total, counts, self.min_cells), self.min_replicates
            else:
                left.append(np.zeros(counts.shape[1:], dtype=np.int64))
                X, V, threshold = total, counts, max(self.min_cells, 1)
            if null is not None:
                null[0, :, layer], null[1, :, layer] = head_null(X, V[:, 0], self.relabelings.in_a, threshold, keep)
        cell = _stacked(cell)
        return (_stacked(unit) if unit else cell), cell, np.stack(left), null

    def _add_permutation_null(self, nulls: dict) -> None:
        """The null columns of the heads and layers tables from every family's null statistics (:meth:`contrast_of`):
        null mean, 95th percentile, excess, p_perm and the Westfall–Young p_fwer within each family."""
        stats = {"heads": STATS, "layers": (*STATS, LAYER_MAX_OF_MEAN)}
        parts = {table: {s: [] for s in names} for table, names in stats.items()}
        for family in self.contrasts:
            mean_abs, max_abs = nulls[family]  # [1 + N, layers, heads]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a layer without elements: NaN
                layer_stats = {"mean_abs_diff": np.nanmean(mean_abs, -1), "max_abs_diff": np.nanmax(max_abs, -1),
                               LAYER_MAX_OF_MEAN: np.nanmax(mean_abs, -1)}  # fmt: skip
            for stat, values in (("mean_abs_diff", mean_abs), ("max_abs_diff", max_abs)):
                parts["heads"][stat].append(values.reshape(len(values), -1))
            for stat in stats["layers"]:
                parts["layers"][stat].append(layer_stats[stat])
        for table, names in stats.items():
            observed = getattr(self, table)
            for stat in names:
                null = np.concatenate(parts[table][stat], axis=1)  # [1 + N, rows] in the table's row order
                obs = observed[stat].to_numpy(dtype=float)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # a head without elements: NaN
                    mean, q95 = np.nanmean(null[1:], 0), np.nanquantile(null[1:], 0.95, axis=0)
                observed[f"{stat}_null_mean"] = mean
                observed[f"{stat}_null_q95"] = q95
                observed[f"{stat}_excess"] = obs - mean
                observed[f"p_perm_{stat}"] = permutation_p(null)
                observed[f"p_fwer_{stat}"] = np.concatenate([westfall_young(part) for part in parts[table][stat]])

    def ranked_heads(self, family: str = "gene") -> pd.DataFrame:
        """The heads of one family, most convincing difference first.

        With permutations: smallest family-wise adjusted ``p_fwer_mean_abs_diff``, then ``p_perm_mean_abs_diff``,
        then the excess over the null mean in units of the null's spread (null 95th percentile minus null mean).
        Without: the largest excess over the noise floor relative to the floor.
        """
        heads = self.heads[self.heads["family"] == family]
        if "p_perm_mean_abs_diff" in heads:
            spread = heads["mean_abs_diff_null_q95"] - heads["mean_abs_diff_null_mean"]
            score = heads["mean_abs_diff_excess"] / spread.where(spread > 0)
            keys = heads.assign(_f=heads["p_fwer_mean_abs_diff"].fillna(2.0), _p=heads["p_perm_mean_abs_diff"].fillna(2.0),
                                _s=-score.fillna(-np.inf))  # fmt: skip
            return heads.loc[keys.sort_values(["_f", "_p", "_s"], kind="stable").index]
        score = heads["excess_over_noise"] / heads["noise_floor"].where(heads["noise_floor"] > 0)
        return heads.loc[(-score.fillna(-np.inf)).sort_values(kind="stable").index]

    def element_labels(self, family: str) -> np.ndarray:
        p = self.profile
        if family == "position":
            i, j = np.divmod(np.arange(p.window * p.window), p.window)
            return np.char.add(np.char.add(i.astype(str), ","), j.astype(str))
        genes = np.asarray(p.genes, dtype=object)
        if family == "gene":
            return genes
        if family.startswith(SET):
            return genes[self.gene_sets[family[len(SET):]]]
        names = genes[np.asarray(p.panel, dtype=int)]
        return np.array([f"{u}->{v}" for u in names for v in names], dtype=object)

    # ---------------------------------------------------------------- tables
    def n_units(self, group: str) -> int:
        """Replicates of a group at the replicate level, cells at the cell level."""
        return self.replicates[group] if self.unit == "replicate" else self.profile.cells[group]

    # ---------------------------------------------------------------- export
    def to_anndata(self):
        """The gene table as AnnData: obs = layer x head, var = genes, X = mean_a - mean_b."""
        return to_anndata(self)

    def tables(self) -> dict[str, pd.DataFrame]:
        return {
            "heads": self.heads,
            "layers": self.layers,
            "genes": self.genes,
            "context": self.context,
            "pairs": self.pairs,
            "summaries": self.summaries,
        }

    def save(self, directory) -> Path:
        """Write every table as CSV (and Parquet when pyarrow is installed) plus genes.h5ad."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        try:
            import pyarrow  # noqa: F401

            parquet = True
        except ImportError:
            parquet = False
        for name, df in self.tables().items():
            df.to_csv(directory / f"{name}.csv", index=False)
            if parquet:
                df.to_parquet(directory / f"{name}.parquet", index=False)
        if "gene" in self.contrasts:
            self.to_anndata().write_h5ad(directory / "genes.h5ad")
        return directory


def compare(profile: Profile, a, b, min_cells: int | None = None, permutations: int | None = None,
            **options) -> Comparison:  # fmt: skip
    """Difference tables of ``a`` minus ``b`` (see :class:`Comparison`): min_cells default ``DEFAULT_MIN_CELLS``,
    permutations default ``DEFAULT_PERMUTATIONS``; options: ``seed``, ``unit``, ``min_replicates``, ``within``
    (``{"cell_type": "HY GABA"}``: only those cells), ``by`` (the key whose values ``a`` and ``b`` are; default:
    the groups' key, else the kept key holding both) and ``gene_sets`` (name -> genes; default: the run's)."""
    return Comparison(profile, a, b, min_cells=min_cells, permutations=permutations, **options)


def contrast_key(profile: Profile, a, b) -> str | None:
    """The kept key whose values include both groups (None: the profile's groups, also when neither is found,
    so that the error names the groups)."""
    keys = profile.keys()
    if str(a) in profile.groups and str(b) in profile.groups:
        return None
    found = [k for k, values in keys.items() if str(a) in values and str(b) in values]
    if len(found) > 1:
        raise ValueError(f"{a!r} and {b!r} are values of several keys {found}: name the key (by=)")
    return found[0] if found else None


def _gene_sets(profile: Profile, gene_sets) -> dict[str, np.ndarray]:
    """Each gene set's token indices in the profile (default: the sets the run recorded). A set with no gene of
    the profile is refused; genes the profile lacks are left out with a warning naming them."""
    gene_sets = profile.meta.get("gene_sets", {}) if gene_sets is None else gene_sets
    if not gene_sets:
        return {}
    if profile.genes is None or "recv_sum" not in profile.sums:
        raise ValueError("gene sets need gene statistics: this profile has none (profile with a vocabulary)")
    index = {str(g): i for i, g in enumerate(profile.genes)}
    special = special_token_mask(profile)
    out = {}
    for name, genes in gene_sets.items():
        genes = list(dict.fromkeys(str(g) for g in genes))
        missing = [g for g in genes if g not in index]
        held = [index[g] for g in genes if g in index and not special[index[g]]]
        if not held:
            raise ValueError(f"gene set {name!r} has no gene among the profile's genes ({len(genes)} genes, e.g. "
                             f"{genes[:3]}): check the gene names (the vocabulary's, e.g. Ensembl ids)")  # fmt: skip
        if missing:
            warnings.warn(f"gene set {name!r}: {len(missing)} of its {len(genes)} genes are not among the profile's "
                          f"genes (the data's genes in the vocabulary) and are left out: {missing[:10]}",
                          stacklevel=3)  # fmt: skip
        out[str(name)] = np.asarray(sorted(held), dtype=np.int64)
    return out


def _stacked(contrasts: list[Contrast]) -> Contrast:
    """Per-layer contrasts stacked on a new first (layer) axis."""
    fields = Contrast.__dataclass_fields__
    return Contrast(**{f: np.stack([getattr(c, f) for c in contrasts]) for f in fields})
