"""The Nicheformer paper's Extended Data Fig. 4 from one profile: panels A–G, each with its numbers as a tidy table.

- **A / B**: one head's mean attention maps for every value of a key (tissue, technology, section) side by
  side. By default A is the head whose maps differ *least* between the key's values and B the one whose maps
  differ *most*; "differ" is the mean over all pairs of values of the mean |difference| of the two values'
  mean maps, over the map entries both hold (:func:`map_differences`).
- **C**: a gallery of heads on the cells of one value, one head per kind of attention pattern, each picked by a
  stated score from the per-head summaries (:data:`GALLERY`), or chosen by hand.
- **D / E**: per layer, the mean over heads of each head's mean |D| (the paper's "average attention
  difference") for all genes (D) and for the genes of a gene set (E), against the permutation null band.
- **F / G**: per layer, the maximum over heads, in both readings (max over heads of max |D|, and max over heads
  of mean |D|), within one subset of cells (F, e.g. a cell type) and over all cells (G).

Computing (this module) and drawing (:mod:`attnprof.figure_draw`) are apart; :func:`figure_panels` returns
:class:`Panel` objects holding the tables and captions, and a panel whose input the profile lacks holds the
reason and the option that would provide it (it is drawn as a labelled empty panel, never left out).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
import pandas as pd

from .profile import Profile
from .special_tokens import special_token_mask
from .tables import Comparison

#: Heads marked in panels D–G: family-wise adjusted permutation p at most this (as the head heatmap).
FWER_LEVEL = 0.05
#: The paper's gallery (Ext. Data Fig. 4C): kind of pattern -> how its head is scored from the per-head means
#: over the gallery's cells (entropy, context_mass, self_mass, row_max: kernels.SUMMARIES; gene mass =
#: 1 - context_mass - self_mass). Kinds pick in this order, each the best-scoring head not yet picked.
GALLERY = {
    "self": "self_mass: mean mass of a query on itself",
    "metadata-token focus": "context_mass: mean mass on the context tokens (species, assay, modality)",
    "diffuse": "entropy: mean row entropy",
    "self + global": "self_mass x entropy: mass on itself and the rest spread out",
    "concentrated on key genes": "the largest mean attention one gene receives (gene sums; without them "
    "row_max x gene mass)",
    "selective gene interactions": "row_max x gene mass: sharp rows that land on genes",
}
READINGS = {"max_of_max": "max over heads of max |D|", "max_of_mean": "max over heads of mean |D|"}


@dataclass
class Panel:
    """One panel: ``table`` (tidy, written as ``panel_<name>.csv``), ``extra`` tables (``panel_<name>_<key>.csv``),
    ``caption`` (how its numbers were made and chosen) and, when its input is missing, ``missing`` (the
    reason and the option that provides it)."""

    name: str
    title: str
    kind: str  # "maps" or "layers"
    table: pd.DataFrame = field(default_factory=pd.DataFrame)
    extra: dict[str, pd.DataFrame] = field(default_factory=dict)
    caption: str = ""
    missing: str | None = None
    draw: dict = field(default_factory=dict)  # what the drawing needs beyond the tables


def figure_panels(profile: Profile, a: str, b: str, *, maps_by: str | None = None, head_a=None, head_b=None,
                  gallery=None, gallery_group: str | None = None, within: tuple[str, str] | None = None,
                  gene_set: str | None = None, family: str = "gene", min_cells: int | None = None,
                  permutations: int | None = None, seed: int = 0) -> dict[str, Panel]:  # fmt: skip
    """Panels A–G of one profile (see the module doc). ``head_a``, ``head_b``: (layer, head) or None for the
    default; ``gallery``: [(layer, head), ...] or None; ``within``: (key, value) of panel F or None for the
    default; ``gene_set``: a name in ``profile.meta["gene_sets"]`` or None for its first."""
    keys = profile.keys()
    maps_by = maps_by or next(iter(keys))
    if maps_by not in keys:
        raise ValueError(f"--maps-by {maps_by!r} is not a key of this profile; its keys: {list(keys)} (profile "
                         f"with attnprof run --subset-by {maps_by} to keep it)")  # fmt: skip
    for name, head in (("--head-a", head_a), ("--head-b", head_b), *(("--gallery", h) for h in gallery or [])):
        if head is not None:
            check_head(profile, head, name)
    sets = dict((profile.meta or {}).get("gene_sets") or {})
    if gene_set is not None and gene_set not in sets:
        raise ValueError(f"--gene-set {gene_set!r} is not a gene set of this run; its gene sets: {sorted(sets) or 'none'} "
                         f"(attnprof run --gene-set {gene_set}=FILE adds one)")  # fmt: skip
    gene_set = gene_set or next(iter(sets), None)
    view = profile.view(maps_by)
    values = [g for g, n in view.cells.items() if n > 0]
    panels = dict(zip("AB", map_panels(view, maps_by, values, head_a, head_b)))
    panels["C"] = gallery_panel(view, maps_by, values, gallery, gallery_group, min_cells)
    options = dict(min_cells=min_cells, permutations=permutations, seed=seed)
    everything = Comparison(profile, a, b, gene_sets={gene_set: sets[gene_set]} if gene_set else {}, **options)
    family = family if family in everything.contrasts else "position"
    panels["D"] = average_panel("D", everything, family, f"all genes, all cells" if family == "gene" else
                                "position maps (no gene statistics), all cells")  # fmt: skip
    if gene_set is None:
        panels["E"] = Panel("E", "average over heads, gene set", "layers", missing=(
            "this run has no gene set: profile with `attnprof run ... --gene-set NAME=FILE` (one gene per line), "
            "then `attnprof figure OUT --gene-set NAME`"))  # fmt: skip
    else:
        panels["E"] = average_panel("E", everything, f"set:{gene_set}", f"genes of the set {gene_set!r}, all cells")
    panels["F"] = within_panel(profile, a, b, keys, maps_by, within, family, options)
    panels["G"] = maximum_panel("G", everything, family, "all cells")
    return panels


def check_head(profile: Profile, head, option: str) -> tuple[int, int]:
    layer, h = head
    if not 0 <= layer < len(profile.layers) or not 0 <= h < profile.n_heads:
        raise ValueError(f"{option} {layer}:{h} is out of range: the profile has layers 0..{len(profile.layers) - 1} "
                         f"and heads 0..{profile.n_heads - 1} (attnprof's 0-based numbers; the paper's are 1-based)")
    return int(layer), int(h)


def paper(layer: int, head: int | None = None) -> str:
    """attnprof's 0-based numbers with the paper's 1-based ones: ``layer 3 (paper 4), head 2 (paper 3)``."""
    text = f"layer {layer} (paper {layer + 1})"
    return text if head is None else f"{text}, head {head} (paper {head + 1})"


# ------------------------------------------------------------------- maps
def map_kind(profile: Profile) -> tuple[str, str]:
    """("map" or "pos", a description of what the maps cover)."""
    if "map_sum" in profile.sums:
        nb = profile.sums["map_sum"].shape[-1]
        return "map", (f"whole context in {nb} x {nb} bins (bin of position i: i * {nb} // {profile.map_length}); "
                       f"an entry is the mean mass a query of the row bin puts on the keys of the column bin")
    return "pos", (f"the first {profile.window} positions only (exact window; run with --map-bins N for binned "
                   f"maps of the whole context)")


def mean_maps(profile: Profile, group) -> np.ndarray:
    """Mean maps of one group, every layer and head: ``[layers, heads, N, N]``, NaN where no cell holds an entry."""
    prefix = map_kind(profile)[0]
    total = profile.group_sum(f"{prefix}_sum", group)
    count = profile.group_sum(f"{prefix}_count", group)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


def map_differences(view: Profile, values) -> pd.DataFrame:
    """Per layer and head: the mean over all pairs of ``values`` of the mean |difference| of the pair's mean maps
    (over entries both hold), and the pair that differs most."""
    maps = {v: mean_maps(view, v) for v in values}
    nl, nh = len(view.layers), view.n_heads
    pairs = list(combinations(values, 2))
    per_pair = np.full((len(pairs), nl, nh), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an entry no pair holds: NaN
        for k, (v, w) in enumerate(pairs):
            per_pair[k] = np.nanmean(np.abs(maps[v] - maps[w]).reshape(nl, nh, -1), -1)
        score = np.nanmean(per_pair, 0) if pairs else np.full((nl, nh), np.nan)
    worst = np.nanargmax(np.where(np.isnan(per_pair), -np.inf, per_pair), 0) if pairs else np.zeros((nl, nh), int)
    layer, head = np.divmod(np.arange(nl * nh), nh)
    return pd.DataFrame({
        "layer": layer, "head": head, "paper_layer": layer + 1, "paper_head": head + 1,
        "mean_abs_map_difference": score.ravel(),
        "most_different_pair": [" vs ".join(pairs[k]) if pairs else "" for k in worst.ravel()],
        "most_different_pair_difference": per_pair.max(0).ravel() if pairs else np.nan,
    })  # fmt: skip


def map_panels(view: Profile, key: str, values, head_a, head_b) -> tuple[Panel, Panel]:
    how = ("mean over all pairs of values of the mean |difference| of the two values' mean maps, over the entries "
           "both hold")  # fmt: skip
    prefix, covers = map_kind(view)
    scores = map_differences(view, values)
    ranked = scores[scores["mean_abs_map_difference"].notna()].sort_values("mean_abs_map_difference", kind="stable")
    out = []
    for name, given, pick, word in (("A", head_a, 0, "least"), ("B", head_b, -1, "most")):
        if len(values) < 2 or ranked.empty:
            out.append(Panel(name, f"one head's maps per {key}", "maps", missing=(
                f"{key!r} has {len(values)} value(s) with cells: maps side by side need two or more; pick another "
                f"key with --maps-by (profile with attnprof run --subset-by KEY to keep one)")))  # fmt: skip
            continue
        if given is None:
            row = ranked.iloc[pick]
            layer, head = int(row["layer"]), int(row["head"])
            chosen = f"the head whose maps differ {word} between the values of {key!r} ({how})"
        else:
            layer, head = given
            chosen = f"chosen with --head-{name.lower()}"
        table = _maps_table(view, [(layer, head)], values, key, name)
        caption = (f"{name}: {paper(layer, head)}: mean attention maps of each value of {key!r}, {covers}. Head: "
                   f"{chosen}; its mean |difference| {_fmt(scores, layer, head)} (every head's in "
                   f"panel_AB_heads.csv).")  # fmt: skip
        out.append(Panel(name, f"{paper(layer, head)} by {key}", "maps", table, caption=caption,
                         draw={"heads": [(layer, head)], "groups": values, "cells": view.cells, "key": key,
                               "context": view.n_context, "maps": {(g, layer, head): mean_maps(view, g)[layer, head]
                                                                   for g in values}}))  # fmt: skip
    chosen = {(p.draw["heads"][0]): p.name for p in out if p.draw}
    scores["chosen_for"] = [chosen.get((l, h), "") for l, h in zip(scores["layer"], scores["head"])]
    scores["maps_by"], scores["difference_measure"] = key, how
    out[0].extra["heads"] = scores
    return out[0], out[1]


def _fmt(scores: pd.DataFrame, layer: int, head: int) -> str:
    value = scores.loc[(scores["layer"] == layer) & (scores["head"] == head), "mean_abs_map_difference"].item()
    return f"{value:.3g}"


def _maps_table(view: Profile, heads, groups, key: str, panel: str, category=None) -> pd.DataFrame:
    prefix = map_kind(view)[0]
    unit = "bin" if prefix == "map" else "position"
    frames = []
    for k, (layer, head) in enumerate(heads):
        for g in groups:
            m = mean_maps(view, g)[layer, head]
            q, c = np.divmod(np.arange(m.size), m.shape[-1])
            frame = {"panel": panel, "layer": layer, "head": head, "paper_layer": layer + 1, "paper_head": head + 1}
            if category is not None:
                frame["category"] = category[k]
            frames.append(pd.DataFrame({**frame, "maps_by": key, "group": g, "cells": view.cells[g],
                                        f"query_{unit}": q, f"key_{unit}": c, "mean_attention": m.ravel()}))  # fmt: skip
    return pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------- gallery
def head_summaries(view: Profile, group, min_cells: int | None = None) -> pd.DataFrame:
    """Per layer and head: the group's mean of each head summary, and every gallery kind's score."""
    from attnprof.kernels import SUMMARIES

    cells = view.group_sum("cells", group)[:, None, None]
    means = view.group_sum("summary_sum", group) / np.maximum(cells, 1)  # [layers, heads, summaries]
    nl, nh = means.shape[:2]
    layer, head = np.divmod(np.arange(nl * nh), nh)
    table = pd.DataFrame({"layer": layer, "head": head, "paper_layer": layer + 1, "paper_head": head + 1})
    for k, name in enumerate(SUMMARIES):
        table[name] = means[..., k].ravel()
    gene_mass = (1 - table["context_mass"] - table["self_mass"]).clip(lower=0)
    key_genes = table["row_max"] * gene_mass
    if "recv_sum" in view.sums and view.genes is not None:
        count = view.group_sum("recv_count", group)[:, None]  # [layers, 1, genes]
        enough = (count >= max(min_cells or 10, 1)) & ~special_token_mask(view)
        with np.errstate(invalid="ignore", divide="ignore"):
            received = np.where(enough, view.group_sum("recv_sum", group) / count, -np.inf)
        key_genes = pd.Series(received.max(-1).ravel()).replace(-np.inf, np.nan)
    scores = {"self": table["self_mass"], "metadata-token focus": table["context_mass"], "diffuse": table["entropy"],
              "self + global": table["self_mass"] * table["entropy"], "concentrated on key genes": key_genes,
              "selective gene interactions": table["row_max"] * gene_mass}  # fmt: skip
    for kind in GALLERY:
        table[f"score: {kind}"] = scores[kind].to_numpy()
    return table


def gallery_panel(view: Profile, key: str, values, gallery, group, min_cells) -> Panel:
    prefix, covers = map_kind(view)
    if not values:
        return Panel("C", "gallery of heads", "maps", missing=f"no value of {key!r} holds cells: nothing to draw")
    if group is None:
        group = max(values, key=lambda g: view.cells[g])
        which = f"the value of {key!r} with the most cells"
    elif group not in view.groups:
        raise ValueError(f"--gallery-group {group!r} is not a value of {key!r}: its values are {view.groups}")
    else:
        which = "chosen with --gallery-group"
    summaries = head_summaries(view, group, min_cells)
    if gallery:
        heads, kinds = [tuple(h) for h in gallery], ["chosen with --gallery"] * len(gallery)
        how = "heads chosen with --gallery"
    else:
        heads, kinds = [], []
        for kind in GALLERY:
            score = summaries[f"score: {kind}"].to_numpy(dtype=float)
            taken = np.array([(l, h) in heads for l, h in zip(summaries["layer"], summaries["head"])])
            score = np.where(taken | ~np.isfinite(score), -np.inf, score)
            if np.isfinite(score).any():
                best = int(np.argmax(score))
                heads.append((int(summaries["layer"][best]), int(summaries["head"][best])))
                kinds.append(kind)
        how = "one head per kind, each the best-scoring head not yet picked: " + "; ".join(
            f"{k}: {v}" for k, v in GALLERY.items())  # fmt: skip
    chosen = dict(zip(heads, kinds))
    summaries.insert(4, "group", group)
    summaries["chosen_as"] = [chosen.get((l, h), "") for l, h in zip(summaries["layer"], summaries["head"])]
    table = _maps_table(view, heads, [group], key, "C", category=kinds)
    caption = (f"C: mean attention maps of the {view.cells[group]} cells of {key} = {group!r} ({which}), {covers}. "
               f"Heads: {how}. Every head's summaries and scores: panel_C_heads.csv.")  # fmt: skip
    maps = {(group, l, h): mean_maps(view, group)[l, h] for l, h in heads}
    return Panel("C", f"gallery of heads, {key} = {group}", "maps", table, extra={"heads": summaries},
                 caption=caption, draw={"heads": heads, "groups": [group], "cells": view.cells, "key": key,
                                        "kinds": kinds, "context": view.n_context, "maps": maps})  # fmt: skip


# ----------------------------------------------------------------- layers
def _heads_rows(comparison: Comparison, family: str, where: str) -> pd.DataFrame:
    heads = comparison.heads[comparison.heads["family"] == family].copy()
    cols = ["layer", "head", "family", "unit", "n_a", "n_b", "cells_a", "cells_b", "mean_abs_diff", "max_abs_diff",
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


def average_panel(name: str, comparison: Comparison, family: str, where: str) -> Panel:
    """D / E: per layer the mean over heads of each head's mean |D|, its null band and each head's value."""
    layers = comparison.layers[comparison.layers["family"] == family]
    heads = _heads_rows(comparison, family, where)
    table = pd.DataFrame({
        "panel": name, "layer": layers["layer"].to_numpy(), "paper_layer": layers["layer"].to_numpy() + 1,
        "family": family, "cells": where, "contrast": f"{comparison.a} − {comparison.b}", "unit": comparison.unit,
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
               f"(the paper's average attention difference), {where}; dots: each head's mean |D|, ringed where its "
               f"family-wise p ≤ {FWER_LEVEL}; {_null_note(comparison)}.")  # fmt: skip
    return Panel(name, f"average over heads: {where}", "layers", table, extra={"heads": heads}, caption=caption,
                 draw={"readings": ["average"], "contrast": (comparison.a, comparison.b)})


def maximum_panel(name: str, comparison: Comparison, family: str, where: str) -> Panel:
    """F / G: per layer both readings of the maximum over heads, with the head that holds it."""
    layers = comparison.layers[comparison.layers["family"] == family].set_index("layer")
    heads = _heads_rows(comparison, family, where)
    rows = []
    for layer, df in heads.groupby("layer"):
        for reading, stat in (("max_of_max", "max_abs_diff"), ("max_of_mean", "mean_abs_diff")):
            best = df[stat].idxmax() if df[stat].notna().any() else None
            head = -1 if best is None else int(df.at[best, "head"])
            row = {"panel": name, "layer": layer, "paper_layer": layer + 1, "family": family, "cells": where,
                   "contrast": f"{comparison.a} − {comparison.b}", "unit": comparison.unit, "reading": reading,
                   "statistic": READINGS[reading], "value": df[stat].max(), "head": head, "paper_head": head + 1,
                   "head_p_fwer": df.at[best, f"p_fwer_{stat}"] if best is not None and f"p_fwer_{stat}" in df
                   else np.nan}  # fmt: skip
            layer_row = layers.loc[layer]
            known = reading == "max_of_max" and "max_abs_diff_null_q95" in layer_row  # the layers table's maximum
            for col, source in (("null_mean", "max_abs_diff_null_mean"), ("null_q95", "max_abs_diff_null_q95"),
                                ("p_perm", "p_perm_max_abs_diff"), ("p_fwer", "p_fwer_max_abs_diff")):  # fmt: skip
                row[col] = layer_row[source] if known else np.nan
            rows.append(row)
    table = pd.DataFrame(rows)
    caption = (f"{name}: per layer, the maximum over heads of the |{comparison.a} − {comparison.b}| difference, "
               f"{where}, in both readings: left, max over heads of each head's max |D| (the layers table's "
               f"max_abs_diff, with its null band and layer p); right, max over heads of each head's mean |D| (no "
               f"null band: the relabelings' per-head values are not kept; the head holding it carries its "
               f"family-wise p). h = the head holding the maximum (paper's 1-based number in brackets); dots: every "
               f"head, ringed where its family-wise p ≤ {FWER_LEVEL}; {_null_note(comparison)}.")  # fmt: skip
    return Panel(name, f"maximum over heads: {where}", "layers", table, extra={"heads": heads}, caption=caption,
                 draw={"readings": list(READINGS), "contrast": (comparison.a, comparison.b)})


def within_panel(profile: Profile, a, b, keys: dict, maps_by: str, within, family: str, options: dict) -> Panel:
    """F: the maximum panel within one subset (``within`` = (key, value), default the largest value of the
    subset-by key)."""
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
    where = f"cells with {key} = {value}"
    try:
        comparison = Comparison(profile, a, b, within={key: value}, **options)
    except ValueError as e:
        return Panel("F", f"maximum over heads: {where}", "layers", missing=(
            f"{where}: {e}; pick another subset with --within KEY=VALUE"))
    panel = maximum_panel("F", comparison, family, where)
    panel.caption += f" Subset: {how}."
    return panel
