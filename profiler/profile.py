"""The result of a profiling run: float64 sums per layer plus what names them.

A :class:`Profile` is plain data. Profiles of the same layout merge by
addition (batches, shards, machines), save to one ``.npz`` file and load back.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1


@dataclass
class Profile:
    """Group-wise attention sums of one model over a set of cells.

    sums:      name -> float64 array whose first axis is the layer; names and
               shapes as in ``attnprof.kernels.sum_shapes`` (after the layer axis).
    layers:    module names of the profiled attention layers, in model order.
    groups:    group names; code g of the kernels is ``groups[g]``.
    n_heads:   heads per layer.
    window:    position window W.
    n_context: leading context tokens C used for ``context_mass``.
    genes:     names of the token ids (the vocabulary), or None without gene statistics.
    panel:     token ids of the gene-pair panel.
    meta:      free-form run metadata (JSON-serializable), e.g. the model and options.
    null:      sums of the same cells under label permutations (the permutation null).
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
    null: list[dict[str, np.ndarray]] = field(default_factory=list)

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
            "sums": {k: list(v.shape) for k, v in sorted(self.sums.items())},
            "permutations": len(self.null),
        }

    def check_compatible(self, other: Profile) -> None:
        mine, theirs = self.layout(), other.layout()
        diff = [k for k in mine if mine[k] != theirs[k]]
        if diff:
            details = "; ".join(f"{k}: {_short(mine[k])} vs {_short(theirs[k])}" for k in diff)
            raise ValueError(
                f"cannot merge profiles of different layout ({details}); "
                f"profile every shard with the same model, groups, window, vocabulary and panel"
            )
        for key in ("model", "options"):
            if key in self.meta and key in other.meta and self.meta[key] != other.meta[key]:
                raise ValueError(
                    f"cannot merge profiles made with a different {key}: "
                    f"{_short(self.meta[key])} vs {_short(other.meta[key])}"
                )

    def __add__(self, other: Profile) -> Profile:
        self.check_compatible(other)
        sums = {k: self.sums[k] + other.sums[k] for k in self.sums}
        null = [{k: mine[k] + theirs[k] for k in mine} for mine, theirs in zip(self.null, other.null)]
        meta = dict(self.meta)
        meta["merged"] = int(self.meta.get("merged", 1)) + int(other.meta.get("merged", 1))
        return Profile(sums, **{**self._fields(), "meta": meta}, null=null)

    def null_profile(self, i: int) -> Profile:
        """The profile of permutation ``i`` of the labels (same cells, shuffled groups)."""
        return Profile(self.null[i], **self._fields())

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
        )

    # ----------------------------------------------------------------- access
    @property
    def cells(self) -> dict[str, int]:
        """Cells counted per group (the same in every layer)."""
        return {g: int(n) for g, n in zip(self.groups, self.sums["cells"][0])}

    def group_index(self, group) -> int:
        if isinstance(group, (int, np.integer)) and not isinstance(group, bool):
            if not 0 <= group < len(self.groups):
                raise ValueError(f"group code {group} is out of range: this profile has groups {self.groups}")
            return int(group)
        if str(group) not in self.groups:
            raise ValueError(f"unknown group {group!r}: this profile has groups {self.groups}")
        return self.groups.index(str(group))

    def compare(self, a, b, min_cells: int = 1, permutations: int = 0):
        """Difference tables of group ``a`` minus group ``b`` (see :class:`attnprof.Comparison`)."""
        from .tables import compare

        return compare(self, a, b, min_cells=min_cells, permutations=permutations)

    # ---------------------------------------------------------------- storage
    def save(self, path) -> Path:
        """Write one ``.npz`` file atomically (write to a temporary file, then rename)."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(".npz")
        header = {"format_version": FORMAT_VERSION, **self._fields()}
        arrays = {f"sum_{k}": v for k, v in self.sums.items()}
        for i, null in enumerate(self.null):
            arrays.update({f"null{i}_{k}": v for k, v in null.items()})
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez_compressed(f, header=np.array(json.dumps(header)), **arrays)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    @classmethod
    def load(cls, path) -> Profile:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                header = json.loads(str(data["header"]))
                arrays = {k: np.array(data[k], dtype=np.float64) for k in data.files if k != "header"}
        except FileNotFoundError:
            raise
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a readable attnprof profile (truncated or corrupted?): {e}") from e
        version = header.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise ValueError(f"{path} has profile format {version}; this attnprof reads format {FORMAT_VERSION}")
        sums = {k[4:]: v for k, v in arrays.items() if k.startswith("sum_")}
        null = [
            {k.split("_", 1)[1]: v for k, v in arrays.items() if k.startswith(f"null{i}_")}
            for i in range(sum(1 for k in arrays if k.startswith("null") and k.endswith("_cells")))
        ]
        profile = cls(sums, **header, null=null)
        profile._check_shapes(path)
        return profile

    def _check_shapes(self, source) -> None:
        nl = len(self.layers)
        for name in ("cells", "pos_sum", "summary_sum"):
            if name not in self.sums:
                raise ValueError(f"{source}: profile lacks the sum {name!r} (corrupted file?)")
        for sums in (self.sums, *self.null):
            if sums.keys() != self.sums.keys():
                raise ValueError(f"{source}: permutation sums do not match the sums (corrupted file?)")
            for name, arr in sums.items():
                if arr.shape != self.sums[name].shape or arr.shape[:1] != (nl,):
                    raise ValueError(f"{source}: sum {name!r} has shape {arr.shape}, expected {nl} layers first")


def merge(profiles) -> Profile:
    """Sum profiles of the same layout (shards of one dataset)."""
    profiles = list(profiles)
    if not profiles:
        raise ValueError("merge needs at least one profile")
    total = profiles[0]
    for p in profiles[1:]:
        total = total + p
    return total


def _short(x, n: int = 80) -> str:
    s = repr(x)
    return s if len(s) <= n else s[: n - 3] + "..."
