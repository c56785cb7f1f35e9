"""Panels A, B and C of ``attnprof figure`` (:mod:`attnprof.figure`): one head's maps per value of a key, and a
gallery of heads, with the tables behind every choice. Also :class:`Panel`, what every panel returns."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
import pandas as pd

from .profile import Profile
from .special_tokens import special_token_mask
from .tables import DEFAULT_MIN_CELLS

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

def paper(layer: int, head: int | None = None) -> str:
    """attnprof's 0-based numbers with the paper's 1-based ones: ``layer 3 (paper 4), head 2 (paper 3)``."""
    text = f"layer {layer} (paper {layer + 1})"
    return text if head is None else f"{text}, head {head} (paper {head + 1})"


# ------------------------------------------------------------------- maps
def map_short(profile: Profile) -> str:
    """What the maps cover, in a few words (for titles)."""
    if "map_sum" in profile.sums:
        return f"whole context, {profile.sums['map_sum'].shape[-1]} bins"
    return f"first {profile.window} positions"


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


def map_differences(view: Profile, maps: dict) -> pd.DataFrame:
    """Per layer and head: the mean over all pairs of ``values`` of the mean |difference| of the pair's mean maps
    (over entries both hold), and the pair that differs most."""
    values = list(maps)
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
        "most_different_pair_difference": np.where(np.isnan(per_pair), -np.inf, per_pair).max(0).ravel()
        if pairs else np.nan,
    })  # fmt: skip


def map_panels(view: Profile, key: str, maps: dict, head_a, head_b) -> tuple[Panel, Panel]:
    """Panels A and B; ``maps``: value -> its mean maps (:func:`mean_maps`), every value of ``key`` with cells."""
    values = list(maps)
    how = ("mean over all pairs of values of the mean |difference| of the two values' mean maps, over the entries "
           "both hold")  # fmt: skip
    covers = map_kind(view)[1]
    scores = map_differences(view, maps)
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
        table = _maps_table(view, maps, [(layer, head)], values, key, name)
        caption = (f"{name}: {paper(layer, head)}: mean attention maps of each value of {key!r}, {covers}. Head: "
                   f"{chosen}; its mean |difference| {_fmt(scores, layer, head)} (every head's in "
                   f"panel_AB_heads.csv).")  # fmt: skip
        out.append(Panel(name, f"{paper(layer, head)} by {key} ({map_short(view)})", "maps", table, caption=caption,
                         draw={"heads": [(layer, head)], "groups": values, "cells": view.cells, "key": key,
                               "context": view.n_context, "maps": {(g, layer, head): maps[g][layer, head]
                                                                   for g in values}}))  # fmt: skip
    chosen = {}
    for p in out:
        if p.draw:
            chosen.setdefault(p.draw["heads"][0], []).append(p.name)
    scores["chosen_for"] = [";".join(chosen.get((l, h), [])) for l, h in zip(scores["layer"], scores["head"])]
    scores["maps_by"], scores["difference_measure"] = key, how
    out[0].extra["heads"] = scores
    return out[0], out[1]


def _fmt(scores: pd.DataFrame, layer: int, head: int) -> str:
    value = scores.loc[(scores["layer"] == layer) & (scores["head"] == head), "mean_abs_map_difference"].item()
    return f"{value:.3g}"


def _maps_table(view: Profile, maps: dict, heads, groups, key: str, panel: str, category=None) -> pd.DataFrame:
    prefix = map_kind(view)[0]
    unit = "bin" if prefix == "map" else "position"
    frames = []
    for k, (layer, head) in enumerate(heads):
        for g in groups:
            m = maps[g][layer, head]
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
        threshold = max(DEFAULT_MIN_CELLS if min_cells is None else min_cells, 1)  # as the tables' genes
        enough = (count >= threshold) & ~special_token_mask(view)
        with np.errstate(invalid="ignore", divide="ignore"):
            received = np.where(enough, view.group_sum("recv_sum", group) / count, -np.inf)
        key_genes = pd.Series(received.max(-1).ravel()).replace(-np.inf, np.nan)
    scores = {"self": table["self_mass"], "metadata-token focus": table["context_mass"], "diffuse": table["entropy"],
              "self + global": table["self_mass"] * table["entropy"], "concentrated on key genes": key_genes,
              "selective gene interactions": table["row_max"] * gene_mass}  # fmt: skip
    for kind in GALLERY:
        table[f"score: {kind}"] = scores[kind].to_numpy()
    return table


def gallery_panel(view: Profile, key: str, maps: dict, gallery, group, min_cells) -> Panel:
    """Panel C; ``maps`` as for :func:`map_panels`."""
    values = list(maps)
    covers = map_kind(view)[1]
    if not values:
        return Panel("C", "gallery of heads", "maps", missing=f"no value of {key!r} holds cells: nothing to draw")
    if group is None:
        group = max(values, key=lambda g: view.cells[g])
        which = f"the value of {key!r} with the most cells"
    elif group not in maps:
        raise ValueError(f"--gallery-group {group!r} is not a value of {key!r} with cells: its values are {values}")
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
    table = _maps_table(view, maps, heads, [group], key, "C", category=kinds)
    caption = (f"C: mean attention maps of the {view.cells[group]} cells of {key} = {group!r} ({which}), {covers}. "
               f"Heads: {how}. Every head's summaries and scores: panel_C_heads.csv.")  # fmt: skip
    shown = {(group, l, h): maps[group][l, h] for l, h in heads}
    return Panel("C", f"gallery of heads, {key} = {group} ({map_short(view)})", "maps", table, extra={"heads": summaries},
                 caption=caption, draw={"heads": heads, "groups": [group], "cells": view.cells, "key": key,
                                        "kinds": kinds, "context": view.n_context, "maps": shown})  # fmt: skip
