"""Run folders that never mix runs: checked before the work, listed by what the run wrote.

A run folder (``attnprof run --out``, ``attnprof merge --out``) ends with a
manifest, ``run.json``, whose ``outputs`` are exactly the files this run
wrote: those that are new or changed since the folder was claimed, whoever
wrote them (profile, tables, figures, a report, ...). The manifest makes the
rules generic:

- a folder holding a manifest holds another run: it is refused unless
  ``overwrite``; then the files that manifest lists (attnprof's own making)
  are removed before the new outputs are written, and every other file stays;
- files the run did not write are never listed;
- every location is checked before the long work starts, and a folder the
  run created is removed again when the run fails before writing anything.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

#: The manifest of a run folder.
MANIFEST = "run.json"
#: Files and folders attnprof writes into a run folder, and the kind each must be if it exists.
KNOWN = {"profile.npz": "file", MANIFEST: "file", "tables": "folder", "figures": "folder"}


def check_writable_file(path, option: str, overwrite: bool = False, inputs=(), suffix: str = ".npz") -> Path:
    """Check, before any work, that ``path`` (with ``suffix``) can be written as a file; returns that path.

    Refuses a folder, an input of the run, and (without ``overwrite``) an existing file. Its folder may not
    exist yet.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder: give a file name, e.g. {path / ('merged' + suffix)}")
    path = path if path.suffix == suffix else path.with_suffix(suffix)
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder: give a file name, e.g. {path / ('merged' + suffix)}")
    if any(path.resolve() == Path(p).resolve() for p in inputs):
        raise ValueError(f"{option} {path} is also an input: writing it would destroy that input; give a new file")
    if path.exists() and not overwrite:
        raise ValueError(f"{option} {path} exists: give a new file name, or --overwrite to replace it")
    _check_creatable(path.parent, option)
    return path


def _check_creatable(folder: Path, option: str) -> None:
    """The nearest existing ancestor of ``folder`` is a folder that can be written."""
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{option}: {existing} is a file, so {folder} cannot be created; give another location")
    try:  # os.access says yes to root even on a read-only mount: write a probe instead
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".attnprof-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{option}: cannot write in {existing} ({e.strerror}); give a location you can write") from e


class RunFolder:
    """The output folder of one run. Call :meth:`check` first, then use :meth:`claimed` around the work.

    Inside :meth:`claimed`, :meth:`clear_previous` removes the replaced run's outputs (right before the
    new ones are written, so a failed run leaves the previous result whole) and :meth:`finish` writes the
    manifest listing what changed since.
    """

    def __init__(self, path, overwrite: bool = False, option: str = "--out"):
        self.path, self.overwrite, self.option = Path(path), bool(overwrite), option
        self._before: dict[str, tuple] | None = None

    # ------------------------------------------------------------ before work
    def check(self) -> RunFolder:
        """Refuse, before any work, a location that cannot be written or that holds another run."""
        path, option = self.path, self.option
        if path.exists() and not path.is_dir():
            raise ValueError(f"{option} {path} is a file: give a folder for the run's outputs")
        _check_creatable(path, option)
        if not path.is_dir():
            return self
        for name, kind in KNOWN.items():
            p = path / name
            if p.exists() and p.is_dir() != (kind == "folder"):
                raise ValueError(
                    f"{option} {path}: {p} is a {'folder' if p.is_dir() else 'file'} where attnprof writes its "
                    f"{name} {kind}; move it away or give another {option}"
                )
        previous = self.previous_outputs()  # reads (and checks) the manifest
        if (previous is not None or (path / "profile.npz").exists()) and not self.overwrite:
            what = "another run (run.json)" if previous is not None else "a profile.npz of no listed run"
            raise ValueError(
                f"{option} {path} holds {what}: give a new {option}, or add --overwrite to replace that run's "
                f"outputs (files attnprof did not write there stay)"
            )
        return self

    def previous_outputs(self) -> list[Path] | None:
        """The files the manifest in the folder lists (None without a manifest), all inside the folder."""
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            return None
        try:
            listed = json.loads(manifest.read_text())["outputs"]
            paths = [self.path / str(p) for p in listed]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"{self.option} {self.path} holds a {MANIFEST} that is not an attnprof manifest ({e}): "
                f"give another {self.option}, or delete that file"
            ) from e
        root = self.path.resolve()
        outside = [str(p) for p in paths if root not in p.resolve().parents]
        if outside:
            raise ValueError(f"{manifest} lists files outside {self.path} ({outside[0]}): not an attnprof manifest")
        return paths

    # ------------------------------------------------------------- the work
    @contextmanager
    def claimed(self):
        """Create the folder (and its missing parents); remove those again, when empty, if the block fails."""
        created = []
        for folder in [self.path, *self.path.parents]:
            if folder.exists():
                break
            created.append(folder)
        self.path.mkdir(parents=True, exist_ok=True)
        self._before = self._stat_all()
        try:
            yield self
        except BaseException:
            for folder in created:  # deepest first; stops at the first that is not empty
                try:
                    folder.rmdir()
                except OSError:
                    break
            raise

    def clear_previous(self) -> list[Path]:
        """Remove the files the replaced run's manifest lists, and the manifest (only with ``overwrite``)."""
        previous = self.previous_outputs()
        if previous is None:
            return []
        if not self.overwrite:  # check() refused this already; guard against a race
            raise ValueError(f"{self.option} {self.path} holds another run: add --overwrite to replace it")
        removed = []
        for p in [*previous, self.path / MANIFEST]:
            if p.is_file():
                p.unlink()
                removed.append(p)
        for folder in sorted({p.parent for p in removed}, key=lambda f: len(f.parts), reverse=True):
            if folder != self.path and not any(folder.iterdir()):
                folder.rmdir()
        self._before = self._stat_all()
        return removed

    def written(self) -> list[str]:
        """Files (relative, sorted) that are new or changed since the folder was claimed or cleared."""
        before = self._before or {}
        now = self._stat_all()
        return sorted(p for p, stat in now.items() if before.get(p) != stat and p != MANIFEST)

    def finish(self, record: dict) -> dict:
        """Write the manifest: ``record`` plus ``outputs`` (what this run wrote, the manifest included)."""
        record = {**record, "outputs": sorted([*self.written(), MANIFEST])}
        manifest = self.path / MANIFEST
        tmp = manifest.with_name(f".{MANIFEST}.tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, manifest)
        return record

    def _stat_all(self) -> dict[str, tuple]:
        out = {}
        for p in self.path.rglob("*"):
            if p.is_file():
                st = p.stat()
                out[str(p.relative_to(self.path))] = (st.st_ino, st.st_size, st.st_mtime_ns)
        return out


def written_summary(outputs) -> str:
    """The outputs as one line: top-level files, and folders with their file types (``tables/ (csv, parquet)``)."""
    files, folders = [], {}
    for name in outputs:
        top, _, rest = str(name).partition("/")
        if rest:
            folders.setdefault(top, set()).add(Path(rest).suffix.lstrip(".") or "file")
        else:
            files.append(top)
    parts = files + [f"{top}/ ({', '.join(sorted(kinds))})" for top, kinds in sorted(folders.items())]
    return ", ".join(parts)
