"""Figures of a profile: layer-wise difference curves, group-averaged attention maps, per-head heatmaps.

Computing and plotting are apart (as in scanpy): ``attention_map``,
``head_matrix`` and ``strongest_head`` return arrays; the ``plot_*``
functions draw them and return a :class:`matplotlib.figure.Figure` built
without pyplot, so no global backend or state is touched (files render with Agg).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from .profile import Profile
from .tables import Comparison

FAMILY_LABELS = {
    "position": "position maps (first {window} positions)",
    "gene": "attention received per gene",
    "pair": "panel gene pairs",
}
STAT_LABELS = {"mean_abs_diff": "mean |difference|", "max_abs_diff": "max |difference|"}


# --------------------------------------------------------------- computing
def attention_map(profile: Profile, group, layer: int, head: int) -> np.ndarray:
    """Mean attention ``[W, W]`` of one group at one layer and head; NaN where no cell had both positions."""
    g = profile.group_index(group)
    _check_layer_head(profile, layer, head)
    total = profile.sums["pos_sum"][layer, g, head]
    count = profile.sums["pos_count"][layer, g]
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


def strongest_head(comparison: Comparison, family: str = "position") -> tuple[int, int]:
    """The (layer, head) with the largest maximum difference of a family."""
    m = head_matrix(comparison, family, "max_abs_diff")
    if np.isnan(m).all():
        return len(comparison.profile.layers) - 1, 0
    layer, head = np.unravel_index(np.nanargmax(m), m.shape)
    return int(layer), int(head)


def _check_layer_head(profile: Profile, layer: int, head: int) -> None:
    if not 0 <= layer < len(profile.layers):
        raise ValueError(f"layer {layer} is out of range: the profile has layers 0..{len(profile.layers) - 1}")
    if not 0 <= head < profile.n_heads:
        raise ValueError(f"head {head} is out of range: the profile has heads 0..{profile.n_heads - 1}")


# ---------------------------------------------------------------- plotting
def plot_layer_differences(comparison: Comparison) -> Figure:
    """Per layer: mean over heads and max over heads of the attention difference (one line per family).

    The Nicheformer paper's "average" and "maximum attention difference" curves.
    """
    table = comparison.layers
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True)
    titles = {
        "mean_abs_diff": "Average difference (mean over heads of mean |D|)",
        "max_abs_diff": "Maximum difference (max over heads of max |D|)",
    }
    few_layers = table["layer"].nunique() <= 6  # head labels stay legible
    for ax, stat in zip(axes, ("mean_abs_diff", "max_abs_diff")):
        for i, (family, rows) in enumerate(table.groupby("family", sort=False)):
            label = _family_label(family, comparison.profile)
            line = ax.plot(rows["layer"], rows[stat], marker="o", label=label)[0]
            if stat == "max_abs_diff" and few_layers:  # name the head of each maximum, families side by side
                for x, y, h in zip(rows["layer"], rows[stat], rows["max_head"]):
                    if np.isfinite(y):
                        ax.annotate(f"h{h}", (x, y), textcoords="offset points", xytext=(-12 + 12 * i, 6),
                                    ha="center", fontsize=7, color=line.get_color())  # fmt: skip
        values = table[stat].to_numpy(dtype=float)
        values = values[np.isfinite(values) & (values > 0)]
        wide = values.size and values.max() / values.min() > 30  # families on very different scales
        if wide:
            ax.set_yscale("log")
        ax.set_title(titles[stat], fontsize=10)
        ax.set_xlabel("layer")
        ax.set_ylabel(f"|attention difference| ({comparison.a} − {comparison.b}){', log scale' if wide else ''}")
        ax.set_xticks(sorted(table["layer"].unique()))
        ax.margins(x=0.08, y=0.12)  # room for the head labels
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Attention difference per layer: {comparison.a} vs {comparison.b} "
                 f"({_cells(comparison)})")  # fmt: skip
    return fig


def plot_attention_maps(profile: Profile, layer: int, head: int, groups=None) -> Figure:
    """Group-averaged attention maps of one layer and head, and their difference (first minus second)."""
    groups = list(groups) if groups is not None else profile.groups[:2]
    maps = [attention_map(profile, g, layer, head) for g in groups]
    finite = np.concatenate([m[np.isfinite(m)] for m in maps])
    vmax = float(np.quantile(finite, 0.99)) if finite.size else 1.0  # context tokens would wash out the rest
    n = len(maps) + (len(maps) == 2)
    fig = Figure(figsize=(4.2 * n, 4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, n))
    for ax, g, m in zip(axes, groups, maps):
        im = ax.imshow(m, cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        _map_axes(ax, profile, f"{g} (n = {profile.cells[str(g)]})")
        fig.colorbar(im, ax=ax, shrink=0.8, extend="max", label="mean attention probability")
    if len(maps) == 2:
        diff = maps[0] - maps[1]
        finite = np.abs(diff[np.isfinite(diff)])
        lim = float(np.quantile(finite, 0.995)) if finite.size and finite.max() > 0 else 1.0  # one pixel may dominate
        im = axes[-1].imshow(diff, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        _map_axes(axes[-1], profile, f"difference {groups[0]} − {groups[1]}")
        fig.colorbar(im, ax=axes[-1], shrink=0.8, extend="both", label="difference of mean attention")
    fig.suptitle(f"Attention maps, layer {layer} ({profile.layers[layer]}), head {head}")
    return fig


def _map_axes(ax, profile: Profile, title: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
    if profile.n_context:  # the context tokens (species, assay, modality) lead every cell
        edge = profile.n_context - 0.5
        ax.axhline(edge, color="white", lw=0.6, ls="--")
        ax.axvline(edge, color="white", lw=0.6, ls="--")


def plot_head_differences(comparison: Comparison, family: str | None = None) -> Figure:
    """Layers x heads heatmaps of the mean and max absolute difference of one family."""
    family = family or ("gene" if "gene" in comparison.contrasts else "position")
    n_layers = len(comparison.profile.layers)
    fig = Figure(figsize=(10, 2.0 + 0.35 * max(n_layers, 6)), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, stat in zip(axes, ("mean_abs_diff", "max_abs_diff")):
        m = head_matrix(comparison, family, stat)
        im = ax.imshow(m, cmap="magma", aspect="auto", interpolation="nearest")
        ax.set_title(STAT_LABELS[stat], fontsize=10)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(m.shape[1]))
        ax.set_yticks(range(m.shape[0]))
        if m.size <= 64:  # few enough cells to print the values
            for (i, j), v in np.ndenumerate(m):
                if np.isfinite(v):  # dark text on the light end of magma, light text elsewhere
                    ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=7,
                            color="black" if im.norm(v) > 0.6 else "white")  # fmt: skip
        fig.colorbar(im, ax=ax, shrink=0.9, label=f"{STAT_LABELS[stat]} ({comparison.a} − {comparison.b})")
    fig.suptitle(f"Per-head difference, {_family_label(family, comparison.profile)}: {comparison.a} vs {comparison.b}")
    return fig


def save_figures(profile: Profile, comparison: Comparison, directory, *, layer: int | None = None,
                 head: int | None = None, formats=("png", "pdf")) -> list[Path]:  # fmt: skip
    """Write the three figures as PNG and PDF; the map shows the head with the largest position difference."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if layer is None or head is None:
        best_layer, best_head = strongest_head(comparison, "position")
        layer = best_layer if layer is None else layer
        head = best_head if head is None else head
    figures = {
        "layer_differences": plot_layer_differences(comparison),
        "attention_maps": plot_attention_maps(profile, layer, head, groups=[comparison.a, comparison.b]),
        "head_differences": plot_head_differences(comparison),
    }
    written = []
    for name, fig in figures.items():
        for fmt in formats:
            path = directory / f"{name}.{fmt}"
            fig.savefig(path, dpi=150)
            written.append(path)
    return written


def _family_label(family: str, profile: Profile) -> str:
    return FAMILY_LABELS.get(family, family).format(window=profile.window)


def _cells(comparison: Comparison) -> str:
    cells = comparison.profile.cells
    return f"{cells[comparison.a]} vs {cells[comparison.b]} cells"
