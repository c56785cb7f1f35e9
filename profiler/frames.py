"""The tables of a :class:`~attnprof.tables.Comparison` as pandas frames, and their export.

Heads and layers (per head and layer of every family; per layer the paper's mean over heads and max over
heads, and the max over heads of mean |D|),
elements (genes, context tokens, gene pairs, most significant first) and head summaries; the gene table as
AnnData. Everything here reads the comparison's contrasts; nothing computes a statistic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from attnprof.kernels import SUMMARIES

from .statistics import HALF_NORMAL_MEAN, mean_square_diff

if TYPE_CHECKING:
    from .tables import Comparison


def heads_table(cmp: Comparison) -> pd.DataFrame:
    p = cmp.profile
    nl, nh = len(p.layers), p.n_heads
    frames = []
    for family, c in cmp.contrasts.items():
        absd = np.abs(c.diff)
        valid = np.broadcast_to(c.valid, absd.shape)
        n_el = valid.sum(-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_abs = np.where(n_el > 0, np.nansum(absd, -1) / np.maximum(n_el, 1), np.nan)
            # the same average of each element's expected |D| without a difference (NaN SE: one replicate)
            floor = HALF_NORMAL_MEAN * c.se
            n_floor = np.isfinite(floor).sum(-1)
            noise = np.where(n_floor > 0, np.nansum(floor, -1) / np.maximum(n_floor, 1), np.nan)
        msd, rms = mean_square_diff(c.diff, c.se)
        filled = np.where(valid, absd, -np.inf)
        arg = filled.argmax(-1)
        max_abs = np.where(n_el > 0, np.take_along_axis(filled, arg[..., None], -1)[..., 0], np.nan)
        abs_t = np.where(np.isnan(c.t), -np.inf, np.abs(c.t))
        arg_t = abs_t.argmax(-1)
        max_t = abs_t.max(-1)
        cell_t = cmp.cell_contrasts[family].t
        max_t_cells = np.where(np.isnan(cell_t), -np.inf, np.abs(cell_t)).max(-1)
        q = c.q
        min_q = np.where(np.isnan(q), np.inf, q).min(-1)
        labels = cmp.element_labels(family)
        frames.append(
            pd.DataFrame(
                {
                    "layer": np.repeat(np.arange(nl), nh),
                    "head": np.tile(np.arange(nh), nl),
                    "family": family,
                    "unit": cmp.unit,
                    "n_a": cmp.n_units(cmp.a),
                    "n_b": cmp.n_units(cmp.b),
                    "cells_a": p.cells[cmp.a],
                    "cells_b": p.cells[cmp.b],
                    "n_elements": n_el.ravel(),
                    "mean_abs_diff": mean_abs.ravel(),
                    "noise_floor": noise.ravel(),
                    "excess_over_noise": (mean_abs - noise).ravel(),
                    "mean_sq_diff": msd.ravel(),
                    "rms_diff": rms.ravel(),
                    "max_abs_diff": max_abs.ravel(),
                    "where": np.where(n_el > 0, labels[arg], "").ravel(),
                    "max_abs_t": _finite(max_t).ravel(),
                    "max_t_where": np.where(np.isfinite(max_t), labels[arg_t], "").ravel(),
                    "max_abs_t_cells": _finite(max_t_cells).ravel(),
                    "min_q": _finite(min_q).ravel(),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def layers_table(cmp: Comparison) -> pd.DataFrame:
    rows = []
    for (family, layer), df in cmp.heads.groupby(["family", "layer"], sort=False):
        best = df["max_abs_diff"].idxmax() if df["max_abs_diff"].notna().any() else None
        best_t = df["max_abs_t"].idxmax() if df["max_abs_t"].notna().any() else None
        msd = df["mean_sq_diff"].mean()
        rows.append(
            {
                "layer": layer,
                "layer_name": cmp.profile.layers[layer],
                "family": family,
                "unit": cmp.unit,
                "mean_abs_diff": df["mean_abs_diff"].mean(),
                "noise_floor": df["noise_floor"].mean(),
                "excess_over_noise": df["excess_over_noise"].mean(),
                "mean_sq_diff": msd,
                "rms_diff": np.sqrt(max(msd, 0)) if np.isfinite(msd) else np.nan,
                "max_abs_diff": df["max_abs_diff"].max(),
                "max_head_mean_abs_diff": df["mean_abs_diff"].max(),
                "max_head": -1 if best is None else int(df.at[best, "head"]),
                "where": "" if best is None else df.at[best, "where"],
                "max_abs_t": df["max_abs_t"].max(),
                "max_t_head": -1 if best_t is None else int(df.at[best_t, "head"]),
                "max_t_where": "" if best_t is None else df.at[best_t, "max_t_where"],
            }
        )
    return pd.DataFrame(rows)


def element_table(cmp: Comparison, family: str) -> pd.DataFrame:
    """One row per layer, head and valid element; most significant first (Welch p, then |t|)."""
    name = {"gene": ["gene"], "context": ["token"], "pair": ["gene_a", "gene_b"]}[family]
    replicate = cmp.unit == "replicate"
    extra = ["cells_a", "cells_b", "t_cells", "p_cells", "left_out"] if replicate else []
    cols = ["layer", "head", *name, "diff", "t", "p", "q", "n_a", "n_b", "mean_a", "mean_b", *extra]
    source = "gene" if family == "context" else family
    c = cmp.token_contrast if family == "context" else cmp.contrasts.get(family)
    if c is None:
        return pd.DataFrame(columns=cols)
    cells = cmp.cell_tokens if family == "context" else cmp.cell_contrasts[source]
    nl, nh, ne = c.diff.shape
    el = np.flatnonzero(c.valid[0, 0])  # counts are the same in every layer
    layer, head, e = (x.ravel() for x in np.meshgrid(np.arange(nl), np.arange(nh), el, indexing="ij"))
    table = {"layer": layer, "head": head}
    if family == "pair":
        panel = np.asarray(cmp.profile.panel)
        names = np.asarray(cmp.profile.genes, dtype=object)[panel]
        u, v = np.divmod(e, len(panel))
        table["gene_a"], table["gene_b"] = names[u], names[v]
    else:
        table[name[0]] = np.asarray(cmp.profile.genes, dtype=object)[e]
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
    if replicate:
        table.update(
            cells_a=cells.n_a[layer, 0, e].astype(np.int64),
            cells_b=cells.n_b[layer, 0, e].astype(np.int64),
            t_cells=cells.t[layer, head, e],
            p_cells=cells.p[layer, head, e],
            left_out=cmp.left_out[source][layer, 0, e].astype(np.int64),
        )
    if family != "pair":
        ids = cmp.profile.meta.get("token_ids")  # a run keeping only the data's genes: their model token ids
        table["token_id"] = e if ids is None else np.asarray(ids, dtype=np.int64)[e]
    df = pd.DataFrame(table)
    order = np.lexsort((-np.nan_to_num(np.abs(df["t"].to_numpy()), nan=-1.0), np.nan_to_num(df["p"], nan=2.0)))
    return df.iloc[order].reset_index(drop=True)


def summaries_table(cmp: Comparison) -> pd.DataFrame:
    unit, cell, _, _ = cmp.contrast_of("summary")
    nl, nh, ns = unit.diff.shape
    layer, head, k = (x.ravel() for x in np.meshgrid(np.arange(nl), np.arange(nh), np.arange(ns), indexing="ij"))
    table = {
        "layer": layer,
        "head": head,
        "summary": np.asarray(SUMMARIES)[k],
        "mean_a": unit.mean_a[layer, head, k],
        "mean_b": unit.mean_b[layer, head, k],
        "diff": unit.diff[layer, head, k],
        "t": unit.t[layer, head, k],
        "p": unit.p[layer, head, k],
        "q": unit.q[layer, head, k],
        "n_a": cmp.n_units(cmp.a),
        "n_b": cmp.n_units(cmp.b),
    }
    if cmp.unit == "replicate":
        table.update(t_cells=cell.t[layer, head, k], p_cells=cell.p[layer, head, k])
    return pd.DataFrame(table)


def to_anndata(cmp: Comparison):
    """The gene table as AnnData: obs = layer x head, var = genes, X = mean_a - mean_b."""
    import anndata as ad

    if "gene" not in cmp.contrasts:
        raise ValueError("this profile has no gene statistics: profile with genes= (a vocabulary) to get them")
    c = cmp.contrasts["gene"]
    nl, nh, _ = c.diff.shape
    el = np.flatnonzero(c.valid[0, 0])
    obs = pd.DataFrame(
        {"layer": np.repeat(np.arange(nl), nh), "head": np.tile(np.arange(nh), nl)},
        index=[f"L{l}H{h}" for l in range(nl) for h in range(nh)],
    )
    var = pd.DataFrame(
        {"token_id": el if cmp.profile.meta.get("token_ids") is None else np.asarray(cmp.profile.meta["token_ids"])[el],
         "n_a": c.n_a[0, 0, el].astype(np.int64), "n_b": c.n_b[0, 0, el].astype(np.int64)},
        index=pd.Index(np.asarray(cmp.profile.genes, dtype=object)[el].astype(str), name="gene"),
    )

    def mat(x):
        return x[:, :, el].reshape(nl * nh, el.size)

    return ad.AnnData(
        X=mat(c.diff),
        obs=obs,
        var=var,
        layers={"mean_a": mat(c.mean_a), "mean_b": mat(c.mean_b), "t": mat(c.t)},
        uns={"attnprof": {"a": cmp.a, "b": cmp.b, "min_cells": cmp.min_cells, "unit": cmp.unit}},
    )


def _finite(x: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(x), x, np.nan)
