"""One self-contained HTML page per run: settings, the top layers, heads and genes against their
chance levels, the figures (embedded as base64 PNG) and links to the tables.

Reads the same :class:`attnprof.Comparison` the tables come from; rendering is a jinja2 template
(``templates/report.html.j2``) with autoescaping on, so names from the data cannot inject markup.
"""

from __future__ import annotations

import base64
import math
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd

from . import warnings_log
from .tables import Comparison

#: Figures in the order the report shows them, with what each answers.
FIGURES = {
    "layer_differences": "Average and maximum difference per layer, against the permutation null band "
    "(grey: below its 95th percentile), its mean (dashed) and the noise floor (dotted).",
    "head_differences": "Per-head mean and max |difference|; outlined heads have a family-wise adjusted "
    "permutation p ≤ 0.05 (Westfall–Young across all layers x heads).",
    "attention_maps": "Group-averaged attention maps of the head with the most convincing difference, and "
    "their difference.",
    "head_gallery": "Attention maps of chosen heads for one group.",
}


def render_report(comparison: Comparison, *, figures: dict[str, bytes] | None = None,
                  tables: list[str] | None = None, settings: dict | None = None, top: int = 10) -> str:  # fmt: skip
    """The report as an HTML string.

    figures:  name -> PNG bytes (names of ``FIGURES``; others follow in the given order).
    tables:   paths of the table files, relative to where the report will be written.
    settings: name -> value shown under "Run" (command, model, times, ...).
    """
    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(_package_template),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = _num
    figures = figures or {}
    ordered = [n for n in FIGURES if n in figures] + [n for n in figures if n not in FIGURES]
    permuted = "p_perm_mean_abs_diff" in comparison.heads
    families = list(dict.fromkeys(comparison.layers["family"]))
    return env.get_template("report.html.j2").render(
        a=comparison.a,
        b=comparison.b,
        cells=comparison.profile.cells,
        permutations=comparison.permutations,
        permuted=permuted,
        design=comparison.design(),
        unit=comparison.unit,
        replicates=comparison.replicates,
        min_p=comparison.min_p,
        min_cells=comparison.min_cells,
        settings=settings or {},
        layers={f: _band_rows(comparison.layers[comparison.layers["family"] == f], "layer") for f in families},
        heads={f: _band_rows(comparison.ranked_heads(f).head(top), "head") for f in families},
        genes=_gene_rows(comparison, top),
        context=comparison.context.head(5).to_dict("records"),
        figures=[(n, FIGURES.get(n, ""), base64.b64encode(figures[n]).decode("ascii")) for n in ordered],
        tables=tables or [],
        warnings=list(dict.fromkeys([*comparison.profile.meta.get("warnings", []), *warnings_log.recorded()])),
    )


def _package_template(name: str) -> str:
    """A template of the package data, read through importlib.resources' reader of this module's own loader
    (what ``importlib.resources.files(module)`` does on Python 3.12+): never looked up by the name
    ``attnprof``, which a folder of that name in the working directory (a clone) shadows as a namespace."""
    reader = __spec__.loader.get_resource_reader(__spec__.name)
    return reader.files().joinpath("templates").joinpath(name).read_text(encoding="utf-8")


def write_report(comparison: Comparison, path, **options) -> Path:
    """Write :func:`render_report` to ``path`` (UTF-8)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(comparison, **options), encoding="utf-8")
    return path


def _band_rows(table: pd.DataFrame, kind: str) -> list[dict]:
    """Rows with the observed mean |D|, its chance levels and where each sits on a shared 0..max scale."""
    rows = table.to_dict("records")
    cols = ["mean_abs_diff", "noise_floor", "mean_abs_diff_null_q95"]
    scale = max((r[c] for r in rows for c in cols if c in r and _finite(r[c])), default=1.0) or 1.0
    for r in rows:
        r["label"] = f"layer {r['layer']}" + (f", head {r['head']}" if kind == "head" else "")
        r["bar"] = {
            "observed": _pct(r["mean_abs_diff"], scale),
            "floor": _pct(r["noise_floor"], scale),
            "null_mean": _pct(r.get("mean_abs_diff_null_mean"), scale),
            "null_q95": _pct(r.get("mean_abs_diff_null_q95"), scale),
            "above": _finite(r.get("mean_abs_diff_null_q95")) and r["mean_abs_diff"] > r["mean_abs_diff_null_q95"],
        }
    return rows


def _gene_rows(comparison: Comparison, top: int) -> dict:
    """The most significant genes overall, and those of the head ranked first."""
    genes = comparison.genes
    first = comparison.ranked_heads("gene").head(1) if "gene" in comparison.contrasts else pd.DataFrame()
    head_genes = []
    where = None
    if len(first):
        layer, head = int(first.iloc[0]["layer"]), int(first.iloc[0]["head"])
        where = f"layer {layer}, head {head}"
        head_genes = genes[(genes["layer"] == layer) & (genes["head"] == head)].head(top).to_dict("records")
    return {"overall": genes.head(2 * top).to_dict("records"), "head": head_genes, "where": where}


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float, np.floating, np.integer)) and math.isfinite(float(x))


def _pct(x, scale: float) -> float | None:
    return round(100 * float(x) / scale, 2) if _finite(x) and scale > 0 else None


def _num(x, digits: int = 3) -> str:
    """Numbers for people: 3 significant digits, integers as they are, blanks for NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        return f"{float(x):.{digits}g}"
    return str(x)


def run_settings(profile, command=None) -> dict:
    """What the report lists under "Run", from the profile's metadata."""
    import shlex

    meta = profile.meta
    model = meta.get("model", {})
    data = meta.get("data", {})
    settings = {}
    if command:
        settings["command"] = shlex.join(str(c) for c in command)
    if data.get("source"):
        settings["data"] = data["source"] + (f" (subset: {data['subset']})" if data.get("subset") else "")
    if model:
        described = {k: v for k, v in model.items() if k not in ("class", "weights")}
        settings["model"] = f"{model.get('class', '')} {described} weights {model.get('weights', '')}".strip()
    settings["groups (cells)"] = ", ".join(f"{g} ({n})" for g, n in profile.cells.items())
    settings["layers × heads"] = f"{len(profile.layers)} × {profile.n_heads}"
    settings["position window"] = profile.window
    settings["panel"] = ", ".join(profile.genes[i] for i in profile.panel) if profile.genes and profile.panel else "—"
    settings["backend"] = meta.get("backend_used", meta.get("backend", "?"))
    if meta.get("elapsed_s") is not None:
        settings["profiling time"] = f"{meta['elapsed_s']} s"
    return settings
