"""Plain-words checks of what a user gives (data files, group columns) and of what a run found."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .statistics.welch import MIN_REPLICATES

#: Group names shown in a message before it says "... and N more".
SHOWN = 6


def open_h5ad(path, backed: str | None = "r"):
    """An AnnData read from ``path`` (backed by default); a missing or non-h5ad file gets a clear error."""
    import anndata as ad
    import h5py

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    if path.is_dir():
        raise ValueError(f"data file {path} is a folder: give the .h5ad file (zarr stores are not read)")
    if not h5py.is_hdf5(path):  # else h5py's bare "file signature not found"
        raise ValueError(
            f"data file {path} is not an .h5ad file (AnnData's HDF5 format); convert it first, "
            f"e.g. anndata.read_csv(...).write_h5ad(...) or scanpy.read_10x_mtx(...).write_h5ad(...)"
        )
    try:
        return ad.read_h5ad(path, backed=backed)
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"data file {path} is an HDF5 file but not a readable AnnData (.h5ad): {e}") from e


def describe_groups(groups, column: pd.Series | None = None) -> str:
    """``N groups (a, b, c, ... and K more)``; a numeric column with many values is called continuous."""
    groups = [str(g) for g in groups]
    shown = ", ".join(groups[:SHOWN]) + (f", ... and {len(groups) - SHOWN} more" if len(groups) > SHOWN else "")
    text = f"{len(groups)} groups ({shown})"
    if column is not None and pd.api.types.is_float_dtype(column.dtype) and len(groups) > SHOWN:
        text += f": it looks continuous ({column.nunique()} distinct values), not like group labels"
    return text


def nothing_to_compare(profile, a, b, min_cells: int) -> str | None:
    """Why the profile has nothing to compare between groups ``a`` and ``b`` (None when it has something).

    Nothing to compare: a group has fewer than ``min_cells`` cells, every cell had zero counts in the
    vocabulary genes (only its context tokens were profiled), or no element of any family (position,
    gene, pair) was seen in at least ``min_cells`` cells of both groups (with replicates: in at least
    ``min_cells`` cells of each of ``MIN_REPLICATES`` replicates per group).
    """
    cells = profile.cells
    a, b = profile.groups[profile.group_index(a)], profile.groups[profile.group_index(b)]
    min_cells = max(int(min_cells), 1)
    # the data's fault first: no --min-cells and no more cells of the same data would give a comparison
    context_only = (profile.meta.get("data") or {}).get("context_only_cells")
    total = sum(cells.values())
    if context_only is not None and context_only >= total:
        return (
            f"nothing to compare: every one of the {total} cells has zero counts in the vocabulary genes "
            f"(only their context tokens were profiled); check --layer/--use-raw and the gene names (--vocab, --gene-key)"
        )
    few = [f"{g} has {cells[g]}" for g in (a, b) if cells[g] < min_cells]
    if few:
        return (
            f"nothing to compare: {' and '.join(few)} cells, fewer than --min-cells {min_cells}; "
            f"profile more cells of that group or lower --min-cells"
        )
    in_a, in_b = (profile.blocks.of_group(profile.group_index(g)) for g in (a, b))
    replicates = not profile.blocks.pseudo
    for prefix in ("pos", "recv", "pair"):
        counts = profile.sums.get(f"{prefix}_count")
        if counts is None:
            continue
        if replicates:  # replicates holding the element in min_cells cells, MIN_REPLICATES needed per group
            held = counts >= min_cells
            ok = (held[:, in_a].sum(1) >= MIN_REPLICATES) & (held[:, in_b].sum(1) >= MIN_REPLICATES)
        else:
            ok = (counts[:, in_a].sum(1) >= min_cells) & (counts[:, in_b].sum(1) >= min_cells)
        if np.any(ok):
            return None
    if replicates:
        return (
            f"nothing to compare: no position, gene or gene pair is seen in at least {min_cells} cells of "
            f"{MIN_REPLICATES} replicates of both {a} and {b} (--min-cells {min_cells} per replicate); lower "
            f"--min-cells or profile more cells per replicate"
        )
    return (
        f"nothing to compare: no position, gene or gene pair is seen in at least {min_cells} cells of both "
        f"{a} and {b} (--min-cells {min_cells}); lower --min-cells or profile more cells"
    )
