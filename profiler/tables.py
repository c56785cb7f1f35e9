"""Difference tables of one group against another, from a Profile's sums.

For a contrast (a, b) every element (a position pair, a gene, a gene pair, a
head summary) gets ``D = mean_a - mean_b`` and a Welch t with cells as the
replicates, over elements seen in at least ``min_cells`` cells of each group.
Heads and layers are then summarized as in the Nicheformer paper: per layer,
the mean over heads of the mean |D| ("average attention difference") and the
max over heads of the max |D| ("maximum attention difference").

Every summary is set against its chance level. Even with no true difference
|D| is positive: for a normal difference with standard error SE its expected
size is sqrt(2/pi)·SE, so each head's ``noise_floor`` is that value averaged
over the same elements as ``mean_abs_diff`` (and ``excess_over_noise`` the
difference). With label permutations the heads and layers tables also carry,
per statistic, the null mean, the null 95th percentile, the excess over the
null mean and the permutation p-value. A permutation holds sums and counts,
no sums of squares: its statistics are differences of means only.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import stats

from attnprof.kernels import SUMMARIES

from .special_tokens import looks_special, special_token_mask

if TYPE_CHECKING:  # the profile holds sums, the comparison reads them: no import at run time
    from .profile import Profile

FAMILIES = ("position", "gene", "pair")
#: Cells per group an element needs by default: below ~10 replicates a group's variance (and so
#: Welch t and the noise floor) is unreliable, and a token seen in one or two cells per group
#: tops the tables by chance.
DEFAULT_MIN_CELLS = 10
#: E|X| = sqrt(2/pi)·sigma for X ~ N(0, sigma²): the expected |difference| of an element without effect.
HALF_NORMAL_MEAN = float(np.sqrt(2 / np.pi))
STATS = ("mean_abs_diff", "max_abs_diff")


def is_special_token(name) -> bool:
    """Context and special tokens (``<species:mouse>``, ``<pad>``, ``[CLS]``): never listed among genes."""
    return looks_special(name)  # the fallback of profiles that do not record their special token ids


@dataclass
class Contrast:
    """Element-wise statistics of one family, arrays shaped [layers, heads, elements]."""

    mean_a: np.ndarray
    mean_b: np.ndarray
    diff: np.ndarray  # NaN where not valid
    t: np.ndarray  # NaN where not valid or the standard error is zero
    p: np.ndarray  # two-sided Welch p-value (Welch-Satterthwaite degrees of freedom), NaN like t
    n_a: np.ndarray  # [layers, 1, elements] cells behind each element
    n_b: np.ndarray
    valid: np.ndarray  # [layers, 1, elements]
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
    """Means, difference and Welch t from sums, sums of squares and counts (broadcasting)."""
    valid = (n_a >= max(min_cells, 1)) & (n_b >= max(min_cells, 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_a, mean_b = sum_a / n_a, sum_b / n_b
        var_a, var_b = _variance(sum_a, sq_a, n_a, mean_a), _variance(sum_b, sq_b, n_b, mean_b)
        ea, eb = var_a / n_a, var_b / n_b
        se = np.sqrt(ea + eb)
        diff = np.where(valid, mean_a - mean_b, np.nan)
        t = np.where(valid & (se > 0), diff / se, np.nan)
        dof = (ea + eb) ** 2 / (ea**2 / (n_a - 1) + eb**2 / (n_b - 1))
        p = np.where(np.isnan(t), np.nan, 2 * stats.t.sf(np.abs(t), dof))
    return Contrast(mean_a, mean_b, diff, t, p, n_a, n_b, valid, np.where(valid, se, np.nan))


def _variance(total, sq, n, mean) -> np.ndarray:
    """Sample variance from a sum, a sum of squares, a count and the mean; NaN where the squares are absent.

    A permutation's sums carry no sums of squares (``NullSums`` reads them as 0). Real squares are 0
    only where every value is 0, so the sum is 0 too: a zero square under a non-zero sum is an absent
    one, and its variance (hence SE, t and noise floor) is unknown, never 0.
    """
    absent = (sq == 0) & (total != 0)
    var = np.clip(sq - n * mean**2, 0, None) / (n - 1)
    return np.where(absent, np.nan, var)


def bh(p) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values) over all non-NaN entries."""
    p = np.asarray(p, dtype=float)
    q = np.full_like(p, np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        q[ok] = stats.false_discovery_control(p[ok], method="bh")
    return q


class Comparison:
    """All difference tables of group ``a`` minus group ``b``.

    heads:     one row per layer, head and family (position, gene, pair).
    layers:    one row per layer and family: mean over heads and max over heads.
    genes:     one row per layer, head and gene seen in >= min_cells cells of both groups,
               most significant first (Welch p, then |t|); context and special tokens are not genes.
    context:   the same for the context and special tokens (``<species:mouse>``, ...).
    pairs:     one row per layer, head and panel gene pair, likewise.
    summaries: one row per layer, head and head summary (entropy, context, self, row max).

    Element rows carry Welch t, p, Benjamini-Hochberg q (across all layers,
    heads and elements of the table) and the cells behind them. The heads and
    layers tables carry ``noise_floor`` (the expected mean |D| without any
    difference, from the elements' standard errors) and ``excess_over_noise``.
    With permutations (default: every null labeling the profile holds, see
    ``Profiler.set_batch(null_groups=...)``) they also carry, for
    ``mean_abs_diff`` and ``max_abs_diff``: ``<stat>_null_mean``,
    ``<stat>_null_q95`` (the null's 95th percentile), ``<stat>_excess``
    (observed minus null mean) and ``p_perm_<stat>``, the share of null
    labelings whose statistic is at least the observed one, as
    ``(1 + count) / (1 + N)``.
    """

    def __init__(self, profile: Profile, a, b, min_cells: int | None = None, permutations: int | None = None):
        self.profile = profile
        ia, ib = profile.group_index(a), profile.group_index(b)
        if ia == ib:
            raise ValueError(f"compare needs two different groups, got {a!r} twice")
        min_cells = DEFAULT_MIN_CELLS if min_cells is None else int(min_cells)
        self.a, self.b, self.min_cells = profile.groups[ia], profile.groups[ib], min_cells
        cells = profile.sums["cells"][0]
        empty = [profile.groups[i] for i in (ia, ib) if cells[i] == 0]
        if empty:
            raise ValueError(f"group(s) {empty} have zero cells in this profile; cells per group: {profile.cells}")
        self.contrasts = {family: self._contrast(family, ia, ib) for family in self._families()}
        self.token_contrast = None  # context and special tokens, apart from the genes
        if "gene" in self.contrasts and profile.genes is not None:
            special = special_token_mask(profile)  # by the ids the front end recorded (names: old profiles)
            self.token_contrast = self.contrasts["gene"].restricted(special)
            self.contrasts["gene"] = self.contrasts["gene"].restricted(~special)
        self.heads = self._heads_table()
        self.layers = self._layers_table()
        self.permutations = len(profile.null) if permutations is None else int(permutations)
        if self.permutations:
            self._add_permutation_null(self.permutations)
        self.genes = self._element_table("gene")
        self.context = self._element_table("context")
        self.pairs = self._element_table("pair")
        self.summaries = self._summaries_table(ia, ib)

    # ------------------------------------------------------------ statistics
    def _add_permutation_null(self, n: int) -> None:
        available = len(self.profile.null)
        if n < 1 or n > available:
            raise ValueError(
                f"compare(permutations={n}) needs that many label permutations in the profile, which has "
                f"{available}: profile with permutations={max(n, 1)}, or compare with permutations=0"
            )
        nulls = {"heads": [], "layers": []}  # per family: [n, rows] arrays, in the tables' row order
        for family in self.contrasts:
            mean_abs, max_abs = self._null_statistics(family, n)  # [n, layers, heads]
            nulls["heads"].append({"mean_abs_diff": mean_abs.reshape(n, -1), "max_abs_diff": max_abs.reshape(n, -1)})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a layer without elements: NaN
                layer_mean, layer_max = np.nanmean(mean_abs, -1), np.nanmax(max_abs, -1)  # as _layers_table
            nulls["layers"].append({"mean_abs_diff": layer_mean, "max_abs_diff": layer_max})
        for table in ("heads", "layers"):
            observed = getattr(self, table)
            for col in STATS:
                obs = observed[col].to_numpy(dtype=float)
                null = np.concatenate([part[col] for part in nulls[table]], axis=1)
                with np.errstate(invalid="ignore"), warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # a head without elements: NaN, said once
                    p = (1 + (null >= obs).sum(0)) / (1 + n)
                    mean = np.nanmean(null, 0)
                    q95 = np.nanquantile(null, 0.95, axis=0)
                observed[f"{col}_null_mean"] = mean
                observed[f"{col}_null_q95"] = q95
                observed[f"{col}_excess"] = obs - mean
                observed[f"p_perm_{col}"] = np.where(np.isnan(obs), np.nan, p)

    def _null_statistics(self, family: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Each head's mean |D| and max |D| under the first ``n`` permutations, ``[n, layers, heads]``.

        Differences of means only: a permutation holds sums and counts, no sums of squares, so nothing
        here reads a variance. The elements are those the observed table averages over (seen in
        ``min_cells`` cells of both groups, context tokens apart from genes), per permutation.
        """
        prefix = {"position": "pos", "gene": "recv", "pair": "pair"}[family]
        null, p = self.profile.null, self.profile
        ia, ib = p.group_index(self.a), p.group_index(self.b)
        keep = None  # elements of the null's axis that may count (genes: not context tokens)
        if family == "gene":
            ids = np.arange(null.vocab_size or len(p.genes)) if null.genes is None else null.genes
            keep = ~special_token_mask(p)[ids]
        mean_abs = np.full((n, len(p.layers), p.n_heads), np.nan)
        max_abs = np.full_like(mean_abs, np.nan)
        for layer, (sums, counts) in enumerate(zip(null.layers[f"{prefix}_sum"], null.layers[f"{prefix}_count"])):
            sums = sums[:n].reshape(n, sums.shape[1], p.n_heads, -1)  # [n, groups, heads, elements]
            counts = counts[:n].reshape(n, counts.shape[1], 1, -1)
            valid = (counts[:, ia] >= max(self.min_cells, 1)) & (counts[:, ib] >= max(self.min_cells, 1))
            if keep is not None:
                valid &= keep
            with np.errstate(divide="ignore", invalid="ignore"):
                absd = np.abs(sums[:, ia] / counts[:, ia] - sums[:, ib] / counts[:, ib])
            absd = np.where(valid, absd, np.nan)
            n_el = valid.sum(-1)  # [n, 1]
            has = np.broadcast_to(n_el > 0, absd.shape[:-1])
            mean_abs[:, layer] = np.where(has, np.nansum(absd, -1) / np.maximum(n_el, 1), np.nan)
            max_abs[:, layer] = np.where(has, np.where(valid, absd, -np.inf).max(-1), np.nan)
        return mean_abs, max_abs

    def ranked_heads(self, family: str = "gene") -> pd.DataFrame:
        """The heads of one family, most convincing difference first.

        With permutations: smallest ``p_perm_mean_abs_diff`` first, ties broken by the excess over the
        null mean in units of the null's spread (null 95th percentile minus null mean). Without: the
        largest excess over the noise floor relative to the floor.
        """
        heads = self.heads[self.heads["family"] == family]
        if "p_perm_mean_abs_diff" in heads:
            spread = heads["mean_abs_diff_null_q95"] - heads["mean_abs_diff_null_mean"]
            score = heads["mean_abs_diff_excess"] / spread.where(spread > 0)
            keys = heads.assign(_p=heads["p_perm_mean_abs_diff"].fillna(2.0), _s=-score.fillna(-np.inf))
            return heads.loc[keys.sort_values(["_p", "_s"], kind="stable").index]
        score = heads["excess_over_noise"] / heads["noise_floor"].where(heads["noise_floor"] > 0)
        return heads.loc[(-score.fillna(-np.inf)).sort_values(kind="stable").index]

    def _families(self):
        present = {"position": "pos_sum", "gene": "recv_sum", "pair": "pair_sum"}
        return [f for f in FAMILIES if present[f] in self.profile.sums]

    def _contrast(self, family: str, ia: int, ib: int) -> Contrast:
        prefix = {"position": "pos", "gene": "recv", "pair": "pair"}[family]
        s = self.profile.sums
        nl, nh = len(self.profile.layers), self.profile.n_heads

        def flat(name, g, heads=True):
            x = s[f"{prefix}_{name}"][:, g]
            return x.reshape(nl, nh if heads else 1, -1)

        return welch(
            flat("sum", ia), flat("sq", ia), flat("count", ia, heads=False),
            flat("sum", ib), flat("sq", ib), flat("count", ib, heads=False),
            self.min_cells,
        )  # fmt: skip

    def element_labels(self, family: str) -> np.ndarray:
        p = self.profile
        if family == "position":
            i, j = np.divmod(np.arange(p.window * p.window), p.window)
            return np.char.add(np.char.add(i.astype(str), ","), j.astype(str))
        genes = np.asarray(p.genes, dtype=object)
        if family == "gene":
            return genes
        names = genes[np.asarray(p.panel, dtype=int)]
        return np.array([f"{u}->{v}" for u in names for v in names], dtype=object)

    # ---------------------------------------------------------------- tables
    def _heads_table(self) -> pd.DataFrame:
        p = self.profile
        nl, nh = len(p.layers), p.n_heads
        frames = []
        for family, c in self.contrasts.items():
            absd = np.abs(c.diff)
            valid = np.broadcast_to(c.valid, absd.shape)
            n_el = valid.sum(-1)
            with np.errstate(invalid="ignore", divide="ignore"):
                mean_abs = np.where(n_el > 0, np.nansum(absd, -1) / np.maximum(n_el, 1), np.nan)
                # the same average of each element's expected |D| without a difference (NaN SE: one cell)
                floor = HALF_NORMAL_MEAN * c.se
                n_floor = np.isfinite(floor).sum(-1)
                noise = np.where(n_floor > 0, np.nansum(floor, -1) / np.maximum(n_floor, 1), np.nan)
            filled = np.where(valid, absd, -np.inf)
            arg = filled.argmax(-1)
            max_abs = np.where(n_el > 0, np.take_along_axis(filled, arg[..., None], -1)[..., 0], np.nan)
            abs_t = np.where(np.isnan(c.t), -np.inf, np.abs(c.t)).max(-1)
            q = c.q
            min_q = np.where(np.isnan(q), np.inf, q).min(-1)
            labels = self.element_labels(family)[arg]
            frames.append(
                pd.DataFrame(
                    {
                        "layer": np.repeat(np.arange(nl), nh),
                        "head": np.tile(np.arange(nh), nl),
                        "family": family,
                        "n_a": self.profile.cells[self.a],
                        "n_b": self.profile.cells[self.b],
                        "n_elements": n_el.ravel(),
                        "mean_abs_diff": mean_abs.ravel(),
                        "noise_floor": noise.ravel(),
                        "excess_over_noise": (mean_abs - noise).ravel(),
                        "max_abs_diff": max_abs.ravel(),
                        "where": np.where(n_el > 0, labels, "").ravel(),
                        "max_abs_t": np.where(np.isfinite(abs_t), abs_t, np.nan).ravel(),
                        "min_q": np.where(np.isfinite(min_q), min_q, np.nan).ravel(),
                    }
                )
            )
        return pd.concat(frames, ignore_index=True)

    def _layers_table(self) -> pd.DataFrame:
        rows = []
        for (family, layer), df in self.heads.groupby(["family", "layer"], sort=False):
            best = df["max_abs_diff"].idxmax() if df["max_abs_diff"].notna().any() else None
            rows.append(
                {
                    "layer": layer,
                    "layer_name": self.profile.layers[layer],
                    "family": family,
                    "mean_abs_diff": df["mean_abs_diff"].mean(),
                    "noise_floor": df["noise_floor"].mean(),
                    "excess_over_noise": df["excess_over_noise"].mean(),
                    "max_abs_diff": df["max_abs_diff"].max(),
                    "max_head": -1 if best is None else int(df.at[best, "head"]),
                    "where": "" if best is None else df.at[best, "where"],
                }
            )
        return pd.DataFrame(rows)

    def _element_table(self, family: str) -> pd.DataFrame:
        """One row per layer, head and valid element; most significant first (Welch p, then |t|)."""
        name = {"gene": ["gene"], "context": ["token"], "pair": ["gene_a", "gene_b"]}[family]
        cols = ["layer", "head", *name, "diff", "t", "p", "q", "n_a", "n_b", "mean_a", "mean_b"]
        c = self.token_contrast if family == "context" else self.contrasts.get(family)
        if c is None:
            return pd.DataFrame(columns=cols)
        nl, nh, ne = c.diff.shape
        el = np.flatnonzero(c.valid[0, 0])  # counts are the same in every layer
        layer, head, e = (x.ravel() for x in np.meshgrid(np.arange(nl), np.arange(nh), el, indexing="ij"))
        table = {"layer": layer, "head": head}
        if family == "pair":
            panel = np.asarray(self.profile.panel)
            names = np.asarray(self.profile.genes, dtype=object)[panel]
            u, v = np.divmod(e, len(panel))
            table["gene_a"], table["gene_b"] = names[u], names[v]
        else:
            table[name[0]] = np.asarray(self.profile.genes, dtype=object)[e]
        table.update(
            diff=c.diff[layer, head, e],
            t=c.t[layer, head, e],
            p=c.p[layer, head, e],
            q=c.q[layer, head, e],
            n_a=c.n_a[layer, 0, e].astype(np.int64),
            n_b=c.n_b[layer, 0, e].astype(np.int64),
            mean_a=c.mean_a[layer, head, e],
            mean_b=c.mean_b[layer, head, e],
        )
        if family != "pair":
            table["token_id"] = e
        df = pd.DataFrame(table)
        order = np.lexsort((-np.nan_to_num(np.abs(df["t"].to_numpy()), nan=-1.0), np.nan_to_num(df["p"], nan=2.0)))
        return df.iloc[order].reset_index(drop=True)

    def _summaries_table(self, ia: int, ib: int) -> pd.DataFrame:
        s = self.profile.sums
        n = s["cells"][:, :, None, None]  # [layers, groups, 1, 1]
        c = welch(
            s["summary_sum"][:, ia], s["summary_sq"][:, ia], n[:, ia],
            s["summary_sum"][:, ib], s["summary_sq"][:, ib], n[:, ib],
            self.min_cells,
        )  # fmt: skip
        nl, nh, ns = c.diff.shape
        layer, head, k = (x.ravel() for x in np.meshgrid(np.arange(nl), np.arange(nh), np.arange(ns), indexing="ij"))
        return pd.DataFrame(
            {
                "layer": layer,
                "head": head,
                "summary": np.asarray(SUMMARIES)[k],
                "mean_a": c.mean_a[layer, head, k],
                "mean_b": c.mean_b[layer, head, k],
                "diff": c.diff[layer, head, k],
                "t": c.t[layer, head, k],
                "p": c.p[layer, head, k],
                "q": c.q[layer, head, k],
                "n_a": self.profile.cells[self.a],
                "n_b": self.profile.cells[self.b],
            }
        )

    # ---------------------------------------------------------------- export
    def to_anndata(self):
        """The gene table as AnnData: obs = layer x head, var = genes, X = mean_a - mean_b."""
        import anndata as ad

        if "gene" not in self.contrasts:
            raise ValueError("this profile has no gene statistics: profile with genes= (a vocabulary) to get them")
        c = self.contrasts["gene"]
        nl, nh, _ = c.diff.shape
        el = np.flatnonzero(c.valid[0, 0])
        obs = pd.DataFrame(
            {"layer": np.repeat(np.arange(nl), nh), "head": np.tile(np.arange(nh), nl)},
            index=[f"L{l}H{h}" for l in range(nl) for h in range(nh)],
        )
        var = pd.DataFrame(
            {"token_id": el, "n_a": c.n_a[0, 0, el].astype(np.int64), "n_b": c.n_b[0, 0, el].astype(np.int64)},
            index=pd.Index(np.asarray(self.profile.genes, dtype=object)[el].astype(str), name="gene"),
        )

        def mat(x):
            return x[:, :, el].reshape(nl * nh, el.size)

        return ad.AnnData(
            X=mat(c.diff),
            obs=obs,
            var=var,
            layers={"mean_a": mat(c.mean_a), "mean_b": mat(c.mean_b), "t": mat(c.t)},
            uns={"attnprof": {"a": self.a, "b": self.b, "min_cells": self.min_cells}},
        )

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


def compare(profile: Profile, a, b, min_cells: int | None = None, permutations: int | None = None) -> Comparison:
    """Difference tables of ``a`` minus ``b``: min_cells default ``DEFAULT_MIN_CELLS``, permutations default all."""
    return Comparison(profile, a, b, min_cells=min_cells, permutations=permutations)
