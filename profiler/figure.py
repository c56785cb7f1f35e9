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

from .figure_layers import FWER_LEVEL, GENES, READINGS, average_panel, maximum_panel, within_panel
from .figure_maps import GALLERY, Panel, gallery_panel, map_panels, mean_maps, paper
from .profile import Profile
from .tables import Comparison

__all__ = ["FWER_LEVEL", "GALLERY", "READINGS", "Panel", "check_head", "figure_panels", "paper"]


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
    maps = {v: mean_maps(view, v) for v in values}  # every value's mean maps, once
    panels = dict(zip("AB", map_panels(view, maps_by, maps, head_a, head_b)))
    panels["C"] = gallery_panel(view, maps_by, maps, gallery, gallery_group, min_cells)
    options = dict(min_cells=min_cells, permutations=permutations, seed=seed)
    everything = Comparison(profile, a, b, gene_sets={gene_set: sets[gene_set]} if gene_set else {}, **options)
    family = family if family in everything.contrasts else "position"
    panels["D"] = average_panel("D", everything, family, GENES[family])
    if gene_set is None:
        panels["E"] = Panel("E", "average over heads, gene set", "layers", missing=(
            "this run has no gene set: profile with `attnprof run ... --gene-set NAME=FILE` (one gene per line), "
            "then `attnprof figure OUT --gene-set NAME`"))  # fmt: skip
    else:
        panels["E"] = average_panel("E", everything, f"set:{gene_set}", f"genes of the set {gene_set!r}")
    panels["F"] = within_panel(profile, a, b, keys, maps_by, within, family, options)
    panels["G"] = maximum_panel("G", everything, family, GENES[family], "all cells")
    return panels


def check_head(profile: Profile, head, option: str) -> tuple[int, int]:
    layer, h = head
    if not 0 <= layer < len(profile.layers) or not 0 <= h < profile.n_heads:
        raise ValueError(f"{option} {layer}:{h} is out of range: the profile has layers 0..{len(profile.layers) - 1} "
                         f"and heads 0..{profile.n_heads - 1} (attnprof's 0-based numbers; the paper's are 1-based)")
    return int(layer), int(h)
