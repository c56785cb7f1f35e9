"""Figures of a profile: layer-wise difference curves, group-averaged attention maps, per-head heatmaps.

Computing and plotting are apart (as in scanpy): ``attention_map``,
``head_matrix`` and ``strongest_head`` return arrays and indices; the ``plot_*``
functions draw them and return a :class:`matplotlib.figure.Figure` built
without pyplot, so no global backend or state is touched (files render with Agg).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from .profile import Profile
from .tables import FAMILIES as FAMILIES_ORDER, STATS, Comparison

FAMILY_LABELS = {
    "position": "position maps (first {window} positions)",
    "gene": "attention received per gene",
    "pair": "panel gene pairs",
}
STAT_LABELS = {"mean_abs_diff": "mean |difference|", "max_abs_diff": "max |difference|"}
#: Heads outlined in the heatmaps: family-wise adjusted p at most this.
FWER_LEVEL = 0.05


# --------------------------------------------------------------- computing
def attention_map(profile: Profile, group, layer: int, head: int) -> np.ndarray:
    """Mean attention ``[W, W]`` of one group at one layer and head; NaN where no cell had both positions."""
    _check_layer_head(profile, layer, head)
    total = profile.group_sum("pos_sum", group)[layer, head]
    count = profile.group_sum("pos_count", group)[layer]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


def head_matrix(comparison: Comparison, family: str, stat: str = "mean_abs_diff") -> np.ndarray:
    """One statistic of the heads table as a ``[layers, heads]`` array."""
    heads = comparison.heads[comparison.heads["family"] == family]
    if heads.empty:
        raise ValueError(f"this comparison has no {family!r} statistics; families: {sorted(comparison.contrasts)}")
    p = comparison.profile
    out = np.full((len(p.layers), p.n_heads), np.nan)
    out[heads["layer"].to_numpy(), heads["head"].to_numpy()] = heads[stat].to_numpy()
    return out


def strongest_head(comparison: Comparison, family: str | None = None) -> tuple[int, int]:
    """The (layer, head) that differs most convincingly: first of ``Comparison.ranked_heads``
    (family default: gene, else position)."""
    family = family or ("gene" if "gene" in comparison.contrasts else "position")
    ranked = comparison.ranked_heads(family)
    ranked = ranked[ranked["mean_abs_diff"].notna()]
    if ranked.empty:
        return len(comparison.profile.layers) - 1, 0
    return int(ranked.iloc[0]["layer"]), int(ranked.iloc[0]["head"])


def _check_layer_head(profile: Profile, layer: int, head: int) -> None:
    if not 0 <= layer < len(profile.layers):
        raise ValueError(f"layer {layer} is out of range: the profile has layers 0..{len(profile.layers) - 1}")
    if not 0 <= head < profile.n_heads:
        raise ValueError(f"head {head} is out of range: the profile has heads 0..{profile.n_heads - 1}")


# ---------------------------------------------------------------- plotting
UNIT = "attention probability"
NULL_COLOR = "0.55"


def plot_layer_differences(comparison: Comparison) -> Figure:
    """Per layer and family: the mean over heads and the max over heads of |D|, each against its chance level.

    The Nicheformer paper's "average" and "maximum attention difference" curves (Extended Data
    Fig. 4D–G), one row per family, y from zero. Behind each curve: the band under the permutation
    null's 95th percentile and the null mean (with permutations), or the noise floor (without).
    """
    table = comparison.layers
    families = list(dict.fromkeys(table["family"]))
    permuted = "mean_abs_diff_null_q95" in table
    fig = Figure(figsize=(10, 1.0 + 2.4 * len(families)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(families), 2, sharex=True, squeeze=False))
    titles = {
        "mean_abs_diff": "average: mean over heads of mean |D|",
        "max_abs_diff": "maximum: max over heads of max |D|",
    }
    colors = dict(zip(FAMILIES_ORDER, ("tab:blue", "tab:orange", "tab:green")))
    few_layers = table["layer"].nunique() <= 12  # head labels stay legible
    for row, family in zip(axes, families):
        rows = table[table["family"] == family].sort_values("layer")
        x = rows["layer"].to_numpy()
        for ax, stat in zip(row, STATS):
            if permuted:
                ax.fill_between(x, 0, rows[f"{stat}_null_q95"], color=NULL_COLOR, alpha=0.25, lw=0,
                                label="below the permutation null's 95th percentile")  # fmt: skip
                ax.plot(x, rows[f"{stat}_null_mean"], color=NULL_COLOR, ls="--", lw=1, label="permutation null mean")
            if stat == "mean_abs_diff":
                ax.plot(x, rows["noise_floor"], color="black", ls=":", lw=1, label="noise floor, mean of √(2/π)·SE")
            color = colors.get(family, "tab:purple")
            ax.plot(x, rows[stat], marker="o", color=color, label=f"observed, {comparison.a} − {comparison.b}")
            if stat == "max_abs_diff" and few_layers:  # the head holding each maximum
                for xi, yi, h in zip(x, rows[stat], rows["max_head"]):
                    if np.isfinite(yi):
                        ax.annotate(f"h{h}", (xi, yi), textcoords="offset points", xytext=(0, 6), ha="center",
                                    fontsize=7, color=color)  # fmt: skip
            ax.set_ylim(0, _top(ax))
            ax.set_title(f"{_family_label(family, comparison.profile)} — {titles[stat]}", fontsize=9)
            ax.set_ylabel(f"|difference| ({UNIT})", fontsize=8)
            ax.set_xticks(x)
            ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    labels = [lab.replace(f", {comparison.a} − {comparison.b}", f" {comparison.a} − {comparison.b} (colour: family)")
              for lab in labels]  # fmt: skip
    fig.legend(handles, labels, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    for ax in axes[-1]:
        ax.set_xlabel("layer")
    null = (f"{comparison.permutations} relabelings of whole {'replicates' if comparison.unit == 'replicate' else 'pseudo-replicates'}"
            if permuted else "no permutations")  # fmt: skip
    fig.suptitle(f"Attention difference per layer, {comparison.a} vs {comparison.b} ({_cells(comparison)}, {null}; "
                 f"h = head holding the maximum)", fontsize=10)  # fmt: skip
    return fig


def _top(ax) -> float:
    """Upper y limit with room for labels above the highest mark."""
    top = max((np.nanmax(np.asarray(line.get_ydata(), float)) for line in ax.lines if len(line.get_ydata())),
              default=1.0)  # fmt: skip
    for coll in ax.collections:
        paths = [p.vertices[:, 1] for p in coll.get_paths()]
        if paths:
            top = max(top, float(np.nanmax(np.concatenate(paths))))
    return 1.18 * top if np.isfinite(top) and top > 0 else 1.0


def plot_attention_maps(profile: Profile, layer: int, head: int, groups=None) -> Figure:
    """One head's group-averaged attention maps of ``groups`` (default: every group) side by side (Ext. Data
    Fig. 4A–C style), plus their difference when exactly two are shown."""
    groups = list(groups) if groups is not None else list(profile.groups)
    maps = [attention_map(profile, g, layer, head) for g in groups]
    vmax = _map_vmax(maps)
    n = len(maps) + (len(maps) == 2)
    fig = Figure(figsize=(4.2 * n, 4.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, n))
    for ax, g, m in zip(axes, groups, maps):
        im = ax.imshow(m, cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        _map_axes(ax, profile, f"{g} (n = {profile.cells[str(g)]} cells)")
        fig.colorbar(im, ax=ax, shrink=0.8, extend="max", label=f"mean {UNIT}")
    if len(maps) == 2:
        diff = maps[0] - maps[1]
        finite = np.abs(diff[np.isfinite(diff)])
        lim = float(np.quantile(finite, 0.995)) if finite.size and finite.max() > 0 else 1.0  # one pixel may dominate
        im = axes[-1].imshow(diff, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        _map_axes(axes[-1], profile, f"difference {groups[0]} − {groups[1]}")
        fig.colorbar(im, ax=axes[-1], shrink=0.8, extend="both", label=f"difference of mean {UNIT}")
    fig.suptitle(f"Attention maps, layer {layer} ({profile.layers[layer]}), head {head}")
    _caption(fig, profile, vmax, diff=len(maps) == 2)
    return fig


def plot_head_gallery(profile: Profile, group, heads, columns: int = 4) -> Figure:
    """The maps of chosen (layer, head) pairs for one group, one shared colour scale."""
    heads = [(int(l), int(h)) for l, h in heads]
    if not heads:
        raise ValueError("the gallery needs at least one (layer, head), e.g. heads=[(0, 1), (2, 3)]")
    maps = [attention_map(profile, group, l, h) for l, h in heads]
    vmax = _map_vmax(maps)
    cols = min(columns, len(heads))
    rows = -(-len(heads) // cols)
    fig = Figure(figsize=(3.3 * cols + 1.2, 3.4 * rows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, (l, h), m in zip(axes, heads, maps):
        im = ax.imshow(m, cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        _map_axes(ax, profile, f"layer {l}, head {h}")
    for ax in axes[len(heads):]:
        ax.set_axis_off()
    fig.colorbar(im, ax=list(axes[: len(heads)]), shrink=0.8, extend="max", label=f"mean {UNIT}")
    fig.suptitle(f"Attention maps of {group} (n = {profile.cells[str(group)]} cells)")
    _caption(fig, profile, vmax)
    return fig


def _map_vmax(maps) -> float:
    finite = np.concatenate([m[np.isfinite(m)] for m in maps])
    return float(np.quantile(finite, 0.99)) if finite.size else 1.0  # context tokens would wash out the rest


def _caption(fig, profile: Profile, vmax: float, diff: bool = False) -> None:
    parts = [f"maps: colour scale from 0 to the 99th percentile ({vmax:.2g}), brighter entries clipped"]
    if diff:
        parts.append("difference: symmetric scale clipped at the 99.5th percentile of |difference|")
    if profile.n_context:
        parts.insert(0, f"dashed lines: end of the {profile.n_context} context tokens (species, assay, modality)")
    parts.append("grey: no cell has both positions")
    fig.text(0.5, -0.01, "; ".join(parts), ha="center", va="top", fontsize=7)


def _map_axes(ax, profile: Profile, title: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
    ax.set_facecolor("0.85")  # NaN entries: no cell had both positions
    if profile.n_context:  # the context tokens (species, assay, modality) lead every cell
        edge = profile.n_context - 0.5
        ax.axhline(edge, color="white", lw=0.6, ls="--")
        ax.axvline(edge, color="white", lw=0.6, ls="--")


def plot_head_differences(comparison: Comparison, family: str | None = None) -> Figure:
    """Layers x heads heatmaps of the mean and max |D| of one family, from zero; heads whose family-wise
    adjusted permutation p (Westfall–Young across all layers x heads) is at most ``FWER_LEVEL`` are outlined."""
    family = family or ("gene" if "gene" in comparison.contrasts else "position")
    p = comparison.profile
    n_layers, n_heads = len(p.layers), p.n_heads
    fig = Figure(figsize=(min(16, max(8, 2.5 + n_heads)), 2.4 + 0.38 * max(n_layers, 4)), layout="constrained")
    axes = fig.subplots(1, 2)
    permuted = "p_fwer_mean_abs_diff" in comparison.heads
    for ax, stat in zip(axes, STATS):
        m = head_matrix(comparison, family, stat)
        top = np.nanmax(m) if np.isfinite(m).any() and np.nanmax(m) > 0 else 1.0
        im = ax.imshow(m, cmap="magma", aspect="auto", interpolation="nearest", vmin=0, vmax=top)
        ax.set_title(f"{STAT_LABELS[stat]}", fontsize=10)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(_ticks(n_heads))
        ax.set_yticks(_ticks(n_layers))
        if m.size <= 64:  # few enough cells to print the values
            for (i, j), v in np.ndenumerate(m):
                if np.isfinite(v):  # dark text on the light end of magma, light text elsewhere
                    ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=7,
                            color="black" if im.norm(v) > 0.6 else "white")  # fmt: skip
        if permuted:
            found = head_matrix(comparison, family, f"p_fwer_{stat}") <= FWER_LEVEL
            for i, j in zip(*np.nonzero(found)):
                ax.add_patch(Rectangle((j - 0.46, i - 0.46), 0.92, 0.92, fill=False, ec="cyan", lw=2))
        fig.colorbar(im, ax=ax, shrink=0.9, label=f"|{comparison.a} − {comparison.b}| ({UNIT})")
    if permuted:
        outline = Line2D([], [], marker="s", mfc="none", mec="cyan", ls="", ms=10, mew=2)
        unit = "replicates" if comparison.unit == "replicate" else "cells as replicates"
        fig.legend([outline], [f"outlined: family-wise adjusted p ≤ {FWER_LEVEL} ({unit}; Westfall–Young over "
                               f"{n_layers} x {n_heads} heads)"], loc="outside lower center", fontsize=8, frameon=False)  # fmt: skip
    fig.suptitle(f"Per-head difference, {_family_label(family, comparison.profile)}: {comparison.a} vs {comparison.b}")
    return fig


def _ticks(n: int, most: int = 16) -> list[int]:
    """Tick positions that never crowd: every k-th of n so that at most ``most`` are labelled."""
    return list(range(0, n, max(1, -(-n // most))))


def save_figures(profile: Profile, comparison: Comparison, directory, *, layer: int | None = None,
                 head: int | None = None, groups=None, gallery=None, gallery_group=None,
                 formats=("png", "pdf")) -> list[Path]:  # fmt: skip
    """Write the figures in each of ``formats`` (default PNG and PDF); returns the paths written.

    attention_maps: one head's maps for ``groups`` (default: the compared two, with their difference);
    the head defaults to the strongest gene (else position) difference by permutation p or excess.
    head_gallery: the maps of ``gallery`` (layer, head) pairs for ``gallery_group`` (default: group a),
    written when ``gallery`` is given.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if layer is None or head is None:
        best_layer, best_head = strongest_head(comparison)
        layer = best_layer if layer is None else layer
        head = best_head if head is None else head
    figures = {
        "layer_differences": plot_layer_differences(comparison),
        "attention_maps": plot_attention_maps(profile, layer, head, groups=groups or [comparison.a, comparison.b]),
        "head_differences": plot_head_differences(comparison),
    }
    if gallery:
        figures["head_gallery"] = plot_head_gallery(profile, gallery_group or comparison.a, gallery)
    written = []
    for name, fig in figures.items():
        for fmt in formats:
            path = directory / f"{name}.{fmt}"
            fig.savefig(path, dpi=150, bbox_inches="tight")
            written.append(path)
    return written


def _family_label(family: str, profile: Profile) -> str:
    return FAMILY_LABELS.get(family, family).format(window=profile.window)


def _cells(comparison: Comparison) -> str:
    cells = comparison.profile.cells
    return f"{cells[comparison.a]} vs {cells[comparison.b]} cells"
