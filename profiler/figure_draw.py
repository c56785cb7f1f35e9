"""Drawing the panels of :mod:`attnprof.figure`: one figure with every panel, or one figure per panel.

Every drawing function takes a matplotlib (sub)figure and a :class:`~attnprof.figure.Panel`, so the combined
figure and the per-panel files are drawn by the same code. Built without pyplot (files render with Agg).
"""

from __future__ import annotations

import textwrap

import numpy as np
from matplotlib.figure import Figure

from .figure_layers import FWER_LEVEL, READINGS
from .figure_maps import Panel

UNIT = "attention probability"
NULL_COLOR = "0.55"
#: Rows of the combined figure: panels per row.
ROWS = (("A",), ("B",), ("C",), ("D", "E"), ("F", "G"))


def draw_figure(panels: dict[str, Panel], title: str = "") -> Figure:
    """Every panel in one figure: A, B and C (maps) one row each, then D | E and F | G."""
    slots = max(4, *(_n_maps(p) for p in panels.values()))  # maps of every row the same size
    fig = Figure(figsize=(2.9 * min(max(slots, 6), 8), 17.5), layout="constrained")
    rows = fig.subfigures(len(ROWS), 1, height_ratios=[1, 1, 1, 1.05, 1.05])
    for row, names in zip(rows, ROWS):
        cells = row.subfigures(1, len(names)) if len(names) > 1 else [row]
        for sub, name in zip(np.atleast_1d(cells), names):
            draw_panel(sub, panels[name], slots)
    if title:
        fig.suptitle(title, fontsize=12)
    return fig


def _n_maps(panel: Panel) -> int:
    return len(panel.draw.get("groups", [])) * len(panel.draw.get("heads", [])) if panel.kind == "maps" else 0


def panel_figure(panel: Panel) -> Figure:
    """One panel as its own figure."""
    n = _n_maps(panel) or 2
    fig = Figure(figsize=(max(6.0, 3.0 * max(n, 2)), 4.2), layout="constrained")
    draw_panel(fig, panel)
    caption = "\n".join(textwrap.wrap(panel.caption, 160))
    if caption:
        fig.text(0.5, -0.02, caption, ha="center", va="top", fontsize=6)
    return fig


def draw_panel(sub, panel: Panel, slots: int = 0) -> None:
    if panel.missing:
        draw_missing(sub, panel)
    elif panel.kind == "maps":
        draw_maps(sub, panel, slots)
    else:
        draw_layers(sub, panel)


def draw_missing(sub, panel: Panel) -> None:
    """A labelled empty panel: what is missing and the option that provides it."""
    ax = sub.subplots()
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ax.spines.values():
        side.set_linestyle("--")
        side.set_color("0.6")
    ax.text(0.5, 0.5, "\n".join(textwrap.wrap(f"no data: {panel.missing}", 70)), ha="center", va="center",
            fontsize=8, color="0.3", transform=ax.transAxes)  # fmt: skip
    sub.suptitle(f"{panel.name}  {panel.title}", x=0.02, ha="left", fontsize=11, fontweight="bold")


def draw_maps(sub, panel: Panel, slots: int = 0) -> None:
    """One map per (group, head), one colour scale from 0 to the 99th percentile; ``slots``: axes in the row
    (the unused ones hidden), so maps of every row have one size."""
    d = panel.draw
    items = [(g, l, h) for (l, h) in d["heads"] for g in d["groups"]]
    maps = [d["maps"][item] for item in items]
    finite = np.concatenate([m[np.isfinite(m)] for m in maps])
    vmax = float(np.quantile(finite, 0.99)) if finite.size and finite.max() > 0 else 1.0
    axes = np.atleast_1d(sub.subplots(1, max(slots, len(items)), squeeze=False)).ravel()
    for ax in axes[len(items):]:
        ax.set_axis_off()
    axes = axes[: len(items)]
    binned = "query_bin" in panel.table
    kinds = d.get("kinds")
    image = None
    for k, (ax, (g, l, h), m) in enumerate(zip(axes, items, maps)):
        image = ax.imshow(m, cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_facecolor("0.85")  # NaN: no cell holds the entry
        if kinds:  # the gallery: one group, one head per kind
            ax.set_title(f"{kinds[k]}\nL{l} H{h} (paper L{l + 1} H{h + 1})", fontsize=8)
        else:
            ax.set_title(f"{g}\n(n = {d['cells'][g]} cells)", fontsize=8)
        ax.set_xlabel("key bin" if binned else "key position", fontsize=7)
        ax.set_ylabel("query bin" if binned else "query position", fontsize=7)
        ax.tick_params(labelsize=6)
        if d.get("context") and not binned:  # the context tokens lead every cell
            edge = d["context"] - 0.5
            ax.axhline(edge, color="white", lw=0.5, ls="--")
            ax.axvline(edge, color="white", lw=0.5, ls="--")
    sub.colorbar(image, ax=list(axes), shrink=0.8, extend="max", label=f"mean {UNIT}")
    sub.suptitle(f"{panel.name}  {panel.title}", x=0.02, ha="left", fontsize=11, fontweight="bold")


def draw_layers(sub, panel: Panel) -> None:
    """D / E (one axis: the average) and F / G (two axes: both readings of the maximum)."""
    table, heads = panel.table, panel.extra["heads"]
    a, b = panel.draw["contrast"]
    average = panel.draw["readings"] == ["average"]
    axes = np.atleast_1d(sub.subplots(1, 1 if average else 2, squeeze=False)).ravel()
    parts = [("mean over heads of mean |D|", table, "mean_abs_diff")] if average else [
        (READINGS[r], table[table["reading"] == r], stat) for r, stat in
        (("max_of_max", "max_abs_diff"), ("max_of_mean", "mean_abs_diff"))]  # fmt: skip
    for ax, (label, rows, stat) in zip(axes, parts):
        x = rows["layer"].to_numpy()
        if rows["null_q95"].notna().any():
            ax.fill_between(x, 0, rows["null_q95"], color=NULL_COLOR, alpha=0.25, lw=0,
                            label="below the permutation null's 95th percentile")  # fmt: skip
            ax.plot(x, rows["null_mean"], color=NULL_COLOR, ls="--", lw=1, label="permutation null mean")
        if average:
            ax.plot(x, rows["noise_floor"], color="black", ls=":", lw=1, label="noise floor")
        jitter = (heads["head"] / max(heads["head"].max(), 1) - 0.5) * 0.3
        ax.scatter(heads["layer"] + jitter, heads[stat], s=9, color="0.5", zorder=2, label=f"each head's {stat.split('_')[0]} |D|")
        flag = f"{stat}_fwer_le_{FWER_LEVEL}"
        if flag in heads and heads[flag].any():
            hit = heads[heads[flag]]
            ax.scatter(hit["layer"] + jitter[heads[flag]], hit[stat], s=60, facecolors="none", edgecolors="red",
                       lw=1.2, zorder=3, label=f"head with family-wise p ≤ {FWER_LEVEL}")  # fmt: skip
        ax.plot(x, rows["value"], marker="o", color="tab:blue", zorder=4, label=f"observed {a} − {b}")
        if not average:
            for xi, yi, h in zip(x, rows["value"], rows["head"]):
                if np.isfinite(yi) and h >= 0:
                    ax.annotate(f"h{h} ({h + 1})", (xi, yi), textcoords="offset points", xytext=(0, 6),
                                ha="center", fontsize=7, color="tab:blue")  # fmt: skip
        top = np.nanmax([np.nanmax(rows["value"]), np.nanmax(heads[stat]), np.nanmax(rows["null_q95"])
                         if rows["null_q95"].notna().any() else 0])  # fmt: skip
        ax.set_ylim(0, 1.2 * top if np.isfinite(top) and top > 0 else 1.0)
        ax.set_xticks(x, [f"{l}\n({l + 1})" for l in x], fontsize=7)
        ax.set_xlabel("layer (paper's 1-based number in brackets)", fontsize=7)
        ax.set_ylabel(f"|difference| ({UNIT})", fontsize=7)
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="upper left", frameon=False)
    sub.suptitle(f"{panel.name}  {panel.title} ({a} − {b})", x=0.02, ha="left", fontsize=11, fontweight="bold")
