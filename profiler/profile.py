"""The result of a profiling run: float64 sums per layer plus what names them.

A :class:`Profile` is plain data. Profiles of the same layout merge by
addition (batches, shards, machines), save to one ``.npz`` file and load back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .blocks import Blocks
from .merging import check_compatible, merged_meta, shared_cells, summed
from .npz import read_npz, write_npz

#: 2: sums per block (replicate or pseudo-replicate) and the blocks' design; no permutation sums.
FORMAT_VERSION = 2


@dataclass
class Profile:
    """Attention sums of one model over a set of cells, per block (replicate) of each group.

    sums:      name -> float64 array whose first axis is the layer; names and
               shapes as in ``attnprof.kernels.sum_shapes`` (after the layer axis), whose
               group axis holds the blocks: code k of the kernels is block k.
    layers:    module names of the profiled attention layers, in model order.
    groups:    group names; ``blocks.group[k]`` is block k's code in it.
    n_heads:   heads per layer.
    window:    position window W.
    n_context: leading context tokens C used for ``context_mass``.
    genes:     names on the gene axis: the vocabulary, or only the ids the data can hold (their token ids
               then in ``meta["token_ids"]``); None without gene statistics.
    panel:     the gene-pair panel as positions on the gene axis (token ids when ``genes`` is the vocabulary).
    meta:      free-form run metadata (JSON-serializable), e.g. the model and options.
               ``meta["data"]["cells_digest"]``, where present, names the set of cells
               profiled: merging two profiles of the same cells is refused.
    blocks:    the :class:`~attnprof.blocks.Blocks` (replicates, or pseudo-replicates of cells) the sums
               are kept apart for; default one pseudo-replicate block per group.
    cell_ids:  sorted uint64 identities of the counted cells (:func:`attnprof.merging.cell_ids`), or None
               when unknown: merging profiles that share any cell is refused, naming the count.
    map_length: the positions the whole-context maps' bins cover (0: no maps).
    """

    sums: dict[str, np.ndarray]
    layers: list[str]
    groups: list[str]
    n_heads: int
    window: int
    n_context: int = 0
    genes: list[str] | None = None
    panel: list[int] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    blocks: Blocks | None = None
    cell_ids: np.ndarray | None = None
    map_length: int = 0  # bins per axis: map_sum's last axis

    def __post_init__(self):
        if self.blocks is None:
            self.blocks = Blocks.pseudo_replicates(len(self.groups), 1)
        elif isinstance(self.blocks, dict):
            self.blocks = Blocks.from_json(self.blocks)

    # ----------------------------------------------------------------- layout
    def layout(self) -> dict:
        """Everything that must agree for two profiles to merge."""
        return {
            "layers": list(self.layers),
            "groups": list(self.groups),
            "n_heads": int(self.n_heads),
            "window": int(self.window),
            "n_context": int(self.n_context),
            "genes": None if self.genes is None else list(self.genes),
            "panel": [int(t) for t in self.panel],
            "map_length": int(self.map_length),
            "blocks": self.blocks.kind(),  # the blocks themselves unite (Blocks.union)
            "sums": {k: [v.shape[0], *v.shape[2:]] for k, v in sorted(self.sums.items())},
        }

    def check_compatible(self, other: Profile) -> None:
        """Raise ``ValueError`` naming what differs when ``other`` cannot be summed with this profile (see
        :func:`attnprof.merging.check_compatible`)."""
        check_compatible(self, other)

    def __add__(self, other: Profile) -> Profile:
        """The sum of two shards' profiles, with both shards' data recorded in ``meta["data"]["shards"]``."""
        self.check_compatible(other)
        shared = shared_cells(self, other)
        if shared:
            raise ValueError(
                f"the two profiles share {shared} cells: merging would count them twice; "
                f"merge profiles of disjoint cells (the shards of one run, not a run and one of its shards)"
            )
        return self._summed(other, merged_meta(self.meta, other.meta))

    def accumulate(self, other: Profile, meta: dict | None = None) -> Profile:
        """The sums of both with ``meta`` (default: this profile's): two parts of one run (a checkpoint, the rest)."""
        self.check_compatible(other)
        return self._summed(other, self.meta if meta is None else meta)

    def _summed(self, other: Profile, meta: dict) -> Profile:
        return summed(self, other, meta)

    def _fields(self) -> dict:
        return dict(
            layers=list(self.layers),
            groups=list(self.groups),
            n_heads=self.n_heads,
            window=self.window,
            n_context=self.n_context,
            genes=None if self.genes is None else list(self.genes),
            panel=list(self.panel),
            meta=dict(self.meta),
            blocks=self.blocks,
            map_length=self.map_length,
        )

    # ----------------------------------------------------------------- access
    @property
    def cells(self) -> dict[str, int]:
        """Cells counted per group (the same in every layer)."""
        per_block = self.sums["cells"][0]
        return {g: int(per_block[self.blocks.of_group(i)].sum()) for i, g in enumerate(self.groups)}

    @property
    def replicates(self) -> dict[str, int]:
        """Replicates (blocks with at least one cell) per group; pseudo-replicates when no replicate key was given."""
        held = self.sums["cells"][0] > 0  # a replicate split by --subset-by counts once
        names = np.asarray(self.blocks.names, dtype=object)
        return {g: len(set(names[held & self.blocks.of_group(i)])) for i, g in enumerate(self.groups)}

    def group_sum(self, name: str, group) -> np.ndarray:
        """One sum of one group (its blocks added up), layers first: ``sums[name][:, blocks of group].sum(1)``."""
        return self.sums[name][:, self.blocks.of_group(self.group_index(group))].sum(1)

    def group_sums(self) -> dict[str, np.ndarray]:
        """Every sum with the blocks of each group added up: a group axis instead of the block axis."""
        return {k: np.stack([self.group_sum(k, g) for g in range(len(self.groups))], axis=1) for k in self.sums}

    def binned_map(self, group, layer, head: int) -> np.ndarray:
        """``[NB, NB]`` whole-context map of one head (layer: name or index): per query bin a and key bin c the
        mean over the group's cells of the mean mass a query in bin a puts on keys in bin c; NaN where no cell counts."""
        if "map_sum" not in self.sums:
            raise ValueError("this profile has no whole-context maps: profile with map_bins= and map_length=")
        i = self.layers.index(layer) if isinstance(layer, str) else int(layer)
        total, count = self.group_sum("map_sum", group)[i, head], self.group_sum("map_count", group)[i]
        return np.divide(total, count, out=np.full_like(total, np.nan), where=count > 0)

    def group_index(self, group) -> int:
        if isinstance(group, (int, np.integer)) and not isinstance(group, bool):
            if not 0 <= group < len(self.groups):
                raise ValueError(f"group code {group} is out of range: this profile has groups {self.groups}")
            return int(group)
        if str(group) not in self.groups:
            raise ValueError(f"unknown group {group!r}: this profile has groups {self.groups}")
        return self.groups.index(str(group))

    def keys(self) -> dict[str, list[str]]:
        """Every kept key (the groups' key, then each ``--subset-by`` key) -> its values."""
        from .views import keys

        return keys(self)

    def view(self, key: str | None = None, within=None) -> Profile:
        """This profile grouped by ``key`` (default: its groups' key) over the cells matching ``within``
        (``{"cell_type": "HY GABA"}``): see :func:`attnprof.views.view`."""
        from .views import view

        return view(self, key, within)

    def compare(self, a, b, min_cells: int | None = None, permutations: int | None = None, **options):
        """Difference tables of group ``a`` minus group ``b`` (see :class:`attnprof.Comparison`).

        min_cells default: ``attnprof.tables.DEFAULT_MIN_CELLS`` (10); permutations (relabelings of whole
        blocks, computed now from the block sums) default ``attnprof.tables.DEFAULT_PERMUTATIONS``.
        """
        from .tables import compare

        return compare(self, a, b, min_cells=min_cells, permutations=permutations, **options)

    # ---------------------------------------------------------------- storage
    def save(self, path) -> Path:
        """Write one ``.npz`` file atomically (write to a temporary file, then rename)."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(".npz")
        write_npz(path, self.to_arrays())
        return path

    @classmethod
    def load(cls, path) -> Profile:
        path = Path(path)
        return cls.from_arrays(read_npz(path, "attnprof profile"), path)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The arrays of the ``.npz`` file: a JSON ``header`` (with the blocks) and ``sum_<name>``."""
        header = {"format_version": FORMAT_VERSION, **self._fields(), "blocks": self.blocks.to_json()}
        try:
            arrays = {"header": np.array(json.dumps(header))}
        except TypeError as e:  # before any file is touched
            raise ValueError(f"cannot save the profile: its meta must be JSON-serializable ({e})") from e
        arrays.update({f"sum_{k}": v for k, v in self.sums.items()})
        if self.cell_ids is not None:
            arrays["cell_ids"] = np.asarray(self.cell_ids, dtype=np.uint64)
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], source) -> Profile:
        """The inverse of :meth:`to_arrays`; other keys are ignored. ``source`` names the file in errors."""
        if "header" not in arrays:
            raise ValueError(f"{source} is not an attnprof profile (no header; corrupted file?)")
        try:
            header = json.loads(str(arrays["header"]))
        except json.JSONDecodeError as e:
            raise ValueError(f"{source} has an unreadable profile header (corrupted file?): {e}") from e
        version = header.pop("format_version", None)
        if version == 1:
            raise ValueError(
                f"{source} has profile format 1 (before replicate blocks: sums per group and permutation sums from the "
                f"forward pass); this attnprof reads format {FORMAT_VERSION}: profile the cells again with this version"
            )
        if version != FORMAT_VERSION:
            raise ValueError(f"{source} has profile format {version}; this attnprof reads format {FORMAT_VERSION}")
        sums = {k[4:]: _float64(arrays[k]) for k in arrays if k.startswith("sum_")}
        ids = arrays.get("cell_ids")
        if ids is not None and (ids.dtype != np.uint64 or ids.ndim != 1 or np.any(ids[1:] < ids[:-1])):
            raise ValueError(f"{source}: cell_ids must be sorted uint64, got {ids.dtype} {ids.shape} (corrupted file?)")
        try:
            profile = cls(sums, **header, cell_ids=ids)
        except TypeError as e:  # a header with unknown or missing fields
            raise ValueError(f"{source} has an unexpected profile header (corrupted file?): {e}") from e
        profile._check_shapes(source)
        return profile

    def _check_shapes(self, source) -> None:
        nl = len(self.layers)
        for name in ("cells", "pos_sum", "summary_sum"):
            if name not in self.sums:
                raise ValueError(f"{source}: profile lacks the sum {name!r} (corrupted file?)")
        for name, arr in self.sums.items():
            if arr.shape[:1] != (nl,):
                raise ValueError(f"{source}: sum {name!r} has shape {arr.shape}, expected {nl} layers first")
            if arr.ndim < 2 or arr.shape[1] != len(self.blocks):
                raise ValueError(f"{source}: sum {name!r} has shape {arr.shape}, expected {len(self.blocks)} blocks "
                                 f"second (corrupted file?)")  # fmt: skip


def merge(profiles) -> Profile:
    """Sum profiles of the same layout (shards of one dataset).

    Refuses, with the reason, profiles of another layout, model, options or vocabulary,
    and two profiles of the same cells (which would count them twice).
    """
    profiles = list(profiles)
    if not profiles:
        raise ValueError("merge needs at least one profile")
    wrong = [type(p).__name__ for p in profiles if not isinstance(p, Profile)]
    if wrong:
        raise TypeError(f"merge takes Profile objects, got {wrong[0]}: load saved ones with attnprof.Profile.load")
    total = profiles[0]
    for p in profiles[1:]:
        total = total + p
    return total


def _float64(x: np.ndarray) -> np.ndarray:
    if x.dtype.kind not in "fiu":
        raise ValueError(f"a profile sum has dtype {x.dtype}, expected numbers (corrupted file?)")
    return x.astype(np.float64, copy=False)
