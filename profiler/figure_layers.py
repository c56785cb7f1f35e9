"""Panels D–G of ``attnprof figure`` (:mod:`attnprof.figure`): per layer the average over heads and both readings
of the maximum over heads of |D|, from :class:`~attnprof.Comparison` tables, with the null band and marked heads."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .figure_maps import Panel
from .profile import Profile
from .tables import Comparison

#: Heads marked in panels D–G: family-wise adjusted permutation p at most this (as the head heatmap).
FWER_LEVEL = 0.05
#: What a family's elements are, in titles and the ``genes`` column.
GENES = {"gene": "all genes", "position": "position maps (no gene statistics)"}
READINGS = {"max_of_max": "max over heads of max |D|", "max_of_mean": "max over heads of mean |D|"}


# ----------------------------------------------------------------- layers
def _heads_rows(comparison: Comparison, family: str, where: str) -> pd.DataFrame:
    heads = comparison.heads[comparison.heads["family"] == family].copy()
    cols = ["layer", "head", "family", "unit", "n_a", "n_b", "cells_a", "cells_b", "mean_abs_diff", "max_abs_diff",
            *[c for c in heads if c.endswith(("_null_mean", "_null_q95"))],
            *[c for c in heads if c.startswith(("p_perm_", "p_fwer_"))]]  # fmt: skip
    heads = heads[cols]
    heads.insert(2, "paper_layer", heads["layer"] + 1)
    heads.insert(3, "paper_head", heads["head"] + 1)
    heads.insert(4, "cells", where)
    heads.insert(5, "contrast", f"{comparison.a} − {comparison.b}")
    for stat in ("mean_abs_diff", "max_abs_diff"):
        if f"p_fwer_{stat}" in heads:
            heads[f"{stat}_fwer_le_{FWER_LEVEL}"] = heads[f"p_fwer_{stat}"] <= FWER_LEVEL
    return heads.reset_index(drop=True)


def _null_note(comparison: Comparison) -> str:
    if comparison.relabelings is None:
        return "no permutations: the dotted line is the noise floor"
    unit = "replicates" if comparison.unit == "replicate" else "pseudo-replicate blocks of cells"
    return (f"grey band: below the 95th percentile of the permutation null ({comparison.permutations} relabelings "
            f"of whole {unit}); {comparison.design()}")


def _no_family(name: str, title: str, comparison: Comparison, family: str, genes: str) -> Panel:
    return Panel(name, f"{title}: {genes}", "layers", missing=(
        f"this comparison has no {family!r} statistics (it has {sorted(comparison.contrasts)}): gene families need "
        f"a vocabulary (attnprof run --vocab) and gene sets attnprof run --gene-set NAME=FILE"))  # fmt: skip


def average_panel(name: str, comparison: Comparison, family: str, genes: str, where: str = "all cells") -> Panel:
    """D / E: per layer the mean over heads of each head's mean |D|, its null band and each head's value."""
    if family not in comparison.contrasts:
        return _no_family(name, "average over heads", comparison, family, genes)
    layers = comparison.layers[comparison.layers["family"] == family]
    heads = _heads_rows(comparison, family, where)
    table = pd.DataFrame({
        "panel": name, "layer": layers["layer"].to_numpy(), "paper_layer": layers["layer"].to_numpy() + 1,
        "family": family, "genes": genes, "cells": where, "contrast": f"{comparison.a} − {comparison.b}",
        "unit": comparison.unit,
        "statistic": "mean over heads of mean |D|", "value": layers["mean_abs_diff"].to_numpy(),
        "noise_floor": layers["noise_floor"].to_numpy(),
    })  # fmt: skip
    for col, source in (("null_mean", "mean_abs_diff_null_mean"), ("null_q95", "mean_abs_diff_null_q95"),
                        ("p_perm", "p_perm_mean_abs_diff"), ("p_fwer", "p_fwer_mean_abs_diff")):  # fmt: skip
        table[col] = layers[source].to_numpy() if source in layers else np.nan
    marked = heads.get(f"mean_abs_diff_fwer_le_{FWER_LEVEL}")
    table[f"heads_fwer_le_{FWER_LEVEL}"] = [
        ";".join(str(h) for h in heads.loc[(heads["layer"] == l) & marked, "head"]) if marked is not None else ""
        for l in table["layer"]]  # fmt: skip
    caption = (f"{name}: per layer, the mean over heads of each head's mean |{comparison.a} − {comparison.b}| "
               f"(the paper's average attention difference), {genes}, {where}; dots: each head's mean |D|, ringed where its "
               f"family-wise p ≤ {FWER_LEVEL}; {_null_note(comparison)}.")  # fmt: skip
    return Panel(name, f"average over heads: {genes}, {where}", "layers", table, extra={"heads": heads}, caption=caption,
                 draw={"readings": ["average"], "contrast": (comparison.a, comparison.b)})


def maximum_panel(name: str, comparison: Comparison, family: str, genes: str, where: str) -> Panel:
    """F / G: per layer both readings of the maximum over heads, with the head that holds it."""
    if family not in comparison.contrasts:
        return _no_family(name, "maximum over heads", comparison, family, genes)
    layers = comparison.layers[comparison.layers["family"] == family].set_index("layer")
    heads = _heads_rows(comparison, family, where)
    rows = []
    for layer, df in heads.groupby("layer"):
        for reading, stat in (("max_of_max", "max_abs_diff"), ("max_of_mean", "mean_abs_diff")):
            best = df[stat].idxmax() if df[stat].notna().any() else None
            head = -1 if best is None else int(df.at[best, "head"])
            row = {"panel": name, "layer": layer, "paper_layer": layer + 1, "family": family, "genes": genes,
                   "cells": where,
                   "contrast": f"{comparison.a} − {comparison.b}", "unit": comparison.unit, "reading": reading,
                   "statistic": READINGS[reading], "value": df[stat].max(), "head": head, "paper_head": head + 1,
                   "head_p_fwer": df.at[best, f"p_fwer_{stat}"] if best is not None and f"p_fwer_{stat}" in df
                   else np.nan}  # fmt: skip
            layer_row = layers.loc[layer]
            column = "max_abs_diff" if reading == "max_of_max" else "max_head_mean_abs_diff"  # the layers table's
            for col, source in (("null_mean", f"{column}_null_mean"), ("null_q95", f"{column}_null_q95"),
                                ("p_perm", f"p_perm_{column}"), ("p_fwer", f"p_fwer_{column}")):  # fmt: skip
                row[col] = layer_row[source] if source in layer_row else np.nan
            rows.append(row)
    table = pd.DataFrame(rows)
    caption = (f"{name}: per layer, the maximum over heads of the |{comparison.a} − {comparison.b}| difference, "
               f"{genes}, {where}, in both readings: left, max over heads of each head's max |D| (the layers table's "
               f"max_abs_diff, with its null band and layer p); right, max over heads of each head's mean |D| (the "
               f"layers table's max_head_mean_abs_diff, likewise with its null band and layer p; the head holding it "
               f"carries its family-wise p). h = the head holding the maximum (paper's 1-based number in brackets); dots: every "
               f"head, ringed where its family-wise p ≤ {FWER_LEVEL}; {_null_note(comparison)}.")  # fmt: skip
    return Panel(name, f"maximum over heads: {genes}, {where}", "layers", table, extra={"heads": heads}, caption=caption,
                 draw={"readings": list(READINGS), "contrast": (comparison.a, comparison.b)})


def within_panel(profile: Profile, a, b, keys: dict, maps_by: str, within, family: str, options: dict) -> Panel:
    """F: the maximum panel within one subset (``within`` = (key, value); default: among the subset-by keys other
    than ``maps_by``, one naming a cell type, else the first, and its value with the most cells)."""
    if within is None:
        candidates = [k for k in list(keys)[1:] if k != maps_by] or list(keys)[1:]
        if not candidates:
            return Panel("F", "maximum over heads, one subset", "layers", missing=(
                "this run kept no subset key: profile with `attnprof run ... --subset-by cell_type`, then "
                "`attnprof figure OUT --within cell_type=VALUE` (default: its value with the most cells)"))  # fmt: skip
        key = next((k for k in candidates if "cell" in k.lower() and "type" in k.lower()), candidates[0])
        cells = profile.view(key).cells
        value = max(keys[key], key=lambda v: cells.get(v, 0))
        how = (f"its value with the most cells; key {key!r}: a key naming a cell type if any, else the first "
               f"subset-by key other than --maps-by")  # fmt: skip
    else:
        key, value = within
        if key not in keys or value not in keys[key]:
            raise ValueError(f"--within {key}={value}: the profile's keys and values are "
                             f"{ {k: v[:8] for k, v in keys.items()} } (profile with --subset-by {key} to keep one)")
        how = "chosen with --within"
    where = f"{key} = {value}"
    try:
        comparison = Comparison(profile, a, b, within={key: value}, **options)
    except ValueError as e:
        return Panel("F", f"maximum over heads: {where}", "layers", missing=(
            f"{where}: {e}; pick another subset with --within KEY=VALUE"))
    panel = maximum_panel("F", comparison, family, GENES.get(family, family), where)
    panel.caption += f" Subset: {how}."
    return panel
