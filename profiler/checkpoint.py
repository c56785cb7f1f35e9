"""Resume a long profiling run: the sums so far and the cells they cover, saved every N cells.

A checkpoint is one ``.npz`` written atomically (a temporary file, then a
rename), so a run killed at any moment leaves the previous checkpoint whole.
It holds the :class:`~attnprof.Profile` of the cells profiled so far, their
row positions (``done``), the rows of the length buckets that were finished
(``closed``), and a fingerprint of the run (data, cells, model, options).

Resuming tokenizes only the cells outside finished buckets, which rebuilds
exactly the batches the interrupted run would have made, skips the batches
whose cells are done, and adds the new sums to the saved ones: no cell is
counted twice and none is lost. A checkpoint whose fingerprint differs from
the run's is refused, never mixed in.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from .npz import read_npz, write_npz
from .merging import _differing_keys
from .profile import Profile

CHECKPOINT_VERSION = 1


def shard_path(path, shard: tuple[int, int] | None) -> Path:
    """The checkpoint file of one shard: ``run.npz`` becomes ``run.shard0of4.npz`` (shards never share a file)."""
    path = Path(path)
    if shard is None or shard[1] == 1:
        return path
    return path.with_name(f"{path.stem}.shard{shard[0]}of{shard[1]}{path.suffix}")


def _shard_count(path: Path, base: Path) -> int:
    """How many shards the run that wrote the checkpoint ``path`` (named after ``base``) had."""
    found = re.fullmatch(rf"{re.escape(base.stem)}\.shard\d+of(\d+){re.escape(base.suffix)}", path.name)
    return int(found.group(1)) if found else 1


def _check_same_sharding(base: Path, shard: tuple[int, int] | None) -> None:
    """Refuse when checkpoints of ``base`` exist for another shard count: they would be silently ignored."""
    count = 1 if shard is None else shard[1]
    siblings = [base, *base.parent.glob(f"{base.stem}.shard*of*{base.suffix}")]
    other = sorted(p.name for p in siblings if p.exists() and _shard_count(p, base) != count)
    if other:
        raise ValueError(
            f"{base.parent} holds checkpoints of a run with another number of shards or ranks ({', '.join(other)}); "
            f"this run has {count}: resume with the same number, or delete them to start over"
        )


class Checkpoint:
    """A run's saved state, and the bookkeeping that saves it again every ``every`` cells.

    Use :meth:`open` (which resumes an existing file), then during the run
    :meth:`watch` the token chunks, :meth:`skip_done` the batches, report each
    batch that ran with :meth:`ran`; :meth:`total` adds the saved sums to the
    run's; :meth:`remove` deletes the file once the result is safe.
    """

    def __init__(self, path: Path, fingerprint: dict, every: int):
        if every < 1:
            raise ValueError(f"checkpoint_every must be at least 1 cell, got {every}")
        self.path, self.fingerprint, self.every = Path(path), _normalized(fingerprint), int(every)
        self.prior: Profile | None = None  # sums of the cells done before this run
        self.done = np.empty(0, dtype=np.int64)  # sorted rows counted in prior
        self.closed = np.empty(0, dtype=np.int64)  # sorted rows of finished buckets (subset of done)
        self.counters: dict[str, int] = {}
        self._passed: list[np.ndarray] = []  # rows of this run's batches (run or skipped), in order
        self._n_passed = self._n_tokenized = self._closed_upto = self._since_save = 0

    # -------------------------------------------------------------- opening
    @classmethod
    def open(cls, path, fingerprint: dict, every: int, shard: tuple[int, int] | None = None) -> Checkpoint:
        """The checkpoint of ``path`` (of the shard's own file): the saved state if it exists (same run only)."""
        path = Path(path) if Path(path).suffix else Path(path).with_suffix(".npz")
        _check_same_sharding(path, shard)
        ckpt = cls(shard_path(path, shard), fingerprint, every)
        for stale in ckpt.path.parent.glob(ckpt.path.name + "*.tmp"):
            stale.unlink()  # a temporary file of a run killed while saving
        if ckpt.path.exists():
            ckpt._load()
        return ckpt

    def _load(self) -> None:
        arrays = read_npz(self.path, "attnprof checkpoint")
        header = self._header(arrays)
        diff = [d.removeprefix("run.") for d in _differing_keys(header["fingerprint"], self.fingerprint, "run")]
        if diff:
            named = ", ".join(diff[:4]) + (f" and {len(diff) - 4} more" if len(diff) > 4 else "")
            raise ValueError(
                f"checkpoint {self.path} is from another run ({named} differ): resuming would mix cells of two "
                f"runs; delete it to start over, or rerun the command that wrote it"
            )
        self.prior = Profile.from_arrays(arrays, self.path)
        self.done = np.asarray(arrays["ckpt_done"], dtype=np.int64)
        self.closed = np.asarray(arrays["ckpt_closed"], dtype=np.int64)
        self.counters = {k: int(v) for k, v in header.get("counters", {}).items()}
        if int(self.prior.sums["cells"][0].sum()) > len(self.done):
            raise ValueError(f"checkpoint {self.path} counts more cells than it lists (corrupted?): delete it")

    def _header(self, arrays: dict) -> dict:
        if "ckpt_header" not in arrays or "ckpt_done" not in arrays or "ckpt_closed" not in arrays:
            raise ValueError(f"{self.path} is not an attnprof checkpoint (a profile?): delete it or pass another path")
        try:
            header = json.loads(str(arrays["ckpt_header"]))
        except json.JSONDecodeError as e:
            raise ValueError(f"checkpoint {self.path} has an unreadable header (corrupted?): delete it") from e
        if header.get("version") != CHECKPOINT_VERSION:
            raise ValueError(
                f"checkpoint {self.path} has format {header.get('version')}; this attnprof resumes format "
                f"{CHECKPOINT_VERSION}: delete it to start over"
            )
        return header

    @property
    def n_done(self) -> int:
        return len(self.done)

    def remaining(self, rows: np.ndarray) -> np.ndarray:
        """The rows still to tokenize: all but those of finished buckets."""
        return rows[~np.isin(rows, self.closed, assume_unique=True)]

    # ---------------------------------------------------------- during a run
    def watch(self, chunks: Iterable) -> Iterator:
        """Pass token chunks through, counting the cells tokenized (to see where buckets end)."""
        for chunk in chunks:
            self._n_tokenized += len(chunk)
            yield chunk

    def skip_done(self, batches: Iterable) -> Iterator:
        """Pass on the batches with no done cell; a batch of done cells is skipped (it is in the saved sums)."""
        for batch in batches:
            done = np.isin(batch.rows, self.done, assume_unique=True)
            if done.all():
                self._passed_batch(batch.rows)
            elif done.any():
                raise RuntimeError(
                    f"checkpoint {self.path} counts some cells of a batch but not others: its batches differ "
                    f"from this run's; delete it to start over"
                )
            else:
                yield batch

    def ran(self, rows: np.ndarray, snapshot: Callable[[], tuple[Profile, dict]]) -> None:
        """After a batch of ``rows`` ran; ``snapshot()`` gives the run's sums and counters so far when saving."""
        self._passed_batch(rows)
        self._since_save += len(rows)
        if self._since_save >= self.every:
            self.save(*snapshot())

    def _passed_batch(self, rows: np.ndarray) -> None:
        self._passed.append(np.asarray(rows, dtype=np.int64))
        self._n_passed += len(rows)
        if self._n_passed == self._n_tokenized:  # every tokenized cell went through: a bucket ended
            self._closed_upto = len(self._passed)

    def save(self, current: Profile, counters: dict[str, int]) -> None:
        """Write the saved sums plus ``current`` (this run's so far) and the cells they cover, atomically."""
        passed = np.concatenate(self._passed) if self._passed else np.empty(0, dtype=np.int64)
        closed_now = np.concatenate(self._passed[: self._closed_upto]) if self._closed_upto else passed[:0]
        header = {"version": CHECKPOINT_VERSION, "fingerprint": self.fingerprint, "counters": counters}
        arrays = self.total(current).to_arrays()
        arrays.update(
            ckpt_header=np.array(json.dumps(header)),
            ckpt_done=np.union1d(self.done, passed),
            ckpt_closed=np.union1d(self.closed, closed_now),
        )
        write_npz(self.path, arrays, compress=False)  # written often, deleted at the end: speed over size
        self._since_save = 0

    def total(self, current: Profile | None) -> Profile | None:
        """The saved sums plus ``current``, with ``current``'s meta (either may be None)."""
        if self.prior is None or current is None:
            return current if self.prior is None else self.prior
        return self.prior.accumulate(current, meta=current.meta)

    def remove(self) -> None:
        """Delete the file: the run finished and its result is returned."""
        self.path.unlink(missing_ok=True)


def _normalized(fingerprint: dict) -> dict:
    """The fingerprint as it reads back from JSON (tuples become lists), so saved and fresh ones compare equal."""
    return json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
