"""Run folders that never mix runs, never lose the profile and never take over a user's file.

A run folder (``attnprof run --out``, ``attnprof merge --out``, ``attnprof report``) ends with a
manifest, ``run.json``, whose ``outputs`` are exactly the files this run moved into it. The rules:

- a folder holding a manifest holds another run: it is refused unless ``overwrite``; then the files
  that manifest lists (attnprof's own making) are removed before the new outputs arrive, and every
  other file stays;
- a file where attnprof writes (``profile.npz``, ``report.html``, anything in ``tables/`` or
  ``figures/``) that no manifest lists is a user's: refused before any work unless ``overwrite``;
- outputs are written into a temporary folder beside the run folder and moved in only when complete,
  ``profile.npz`` first; a failure while writing the rest still moves the profile in and leaves a
  manifest marked ``"complete": false``, from which ``attnprof report OUT`` rebuilds the rest;
- every location is checked before the long work starts, and a folder the run created is removed
  again when the run fails before writing anything.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from . import warnings_log

#: The manifest of a run folder.
MANIFEST = "run.json"
#: Files and folders attnprof writes into a run folder, and the kind each must be if it exists.
KNOWN = {"profile.npz": "file", MANIFEST: "file", "report.html": "file", "tables": "folder", "figures": "folder"}
#: The output moved in first: the expensive part, kept when writing the rest fails.
PROFILE = "profile.npz"


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
    new ones are written, so a failed run leaves the previous result whole), the outputs are written
    inside :meth:`staged` and moved in when complete, and :meth:`finish` writes the manifest listing them.
    """

    def __init__(self, path, overwrite: bool = False, option: str = "--out"):
        self.path, self.overwrite, self.option = Path(path), bool(overwrite), option
        self._published: list[str] = []  # outputs this run moved in (relative)

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
        if self.overwrite:
            return self
        if previous is not None and self.previous_record().get("complete") is False:
            raise ValueError(
                f"{option} {path} holds an unfinished run whose {PROFILE} was kept (run.json says complete: false): "
                f"rebuild its tables, figures and report with `attnprof report {path}`, give a new {option}, or add "
                f"--overwrite to replace that run"
            )
        if previous is not None:
            raise ValueError(
                f"{option} {path} holds another run (run.json): give a new {option}, or add --overwrite to replace "
                f"that run's outputs (files attnprof did not write there stay)"
            )
        foreign = self.foreign_files()
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            what = f"files of no listed run ({foreign[0]}{more})"
            if PROFILE in foreign:
                what = "a profile.npz of no listed run"
            raise ValueError(
                f"{option} {path} holds {what} where attnprof writes its outputs: move them away, give a new "
                f"{option}, or add --overwrite to let this run replace them"
            )
        return self

    def foreign_files(self, keep=()) -> list[str]:
        """Files (relative) where attnprof writes its outputs that no manifest lists, except ``keep``."""
        listed = {str(p.relative_to(self.path)) for p in self.previous_outputs() or []}
        found = [name for name in (PROFILE, "report.html") if (self.path / name).is_file()]
        for folder in ("tables", "figures"):
            if (self.path / folder).is_dir():
                found += sorted(str(p.relative_to(self.path)) for p in (self.path / folder).rglob("*")
                                if not p.is_dir())  # fmt: skip
        return [f for f in found if f not in listed and f not in keep]

    def previous_record(self) -> dict:
        """The manifest in the folder ({} without one)."""
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            return {}
        self.previous_outputs()  # checks it
        return json.loads(manifest.read_text())

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
        try:
            yield self
        except BaseException:
            for folder in created:  # deepest first; stops at the first that is not empty
                try:
                    folder.rmdir()
                except OSError:
                    break
            raise

    def clear_previous(self, keep=()) -> list[Path]:
        """Remove the files the replaced run's manifest lists (but ``keep``), and the manifest (only with
        ``overwrite``, or for ``attnprof report`` rebuilding the run's own outputs)."""
        previous = self.previous_outputs()
        if previous is None:
            return []
        if not self.overwrite and not keep:  # check() refused this already; guard against a race
            raise ValueError(f"{self.option} {self.path} holds another run: add --overwrite to replace it")
        removed = []
        for p in [*previous, self.path / MANIFEST]:
            if p.is_file() and str(p.relative_to(self.path)) not in keep:
                p.unlink()
                removed.append(p)
        for folder in sorted({p.parent for p in removed}, key=lambda f: len(f.parts), reverse=True):
            if folder != self.path and not any(folder.iterdir()):
                folder.rmdir()
        return removed

    @contextmanager
    def staged(self, kept=(), record: dict | None = None):
        """A temporary folder beside the run folder to write the outputs into (yielded).

        When the block ends, every file in it is moved into the run folder, ``profile.npz`` first, and a
        manifest marked incomplete lists them (:meth:`finish` completes it). When the block fails, a
        complete ``profile.npz`` is still moved in and listed: the expensive part is never lost.
        ``kept``: outputs already in the folder that stay this run's (``attnprof report``: the profile).
        ``record``: what the manifest says until :meth:`finish` (e.g. the command).
        """
        record = dict(record or {})
        base = self.path.absolute()  # beside it, on the same file system: each move is one rename
        tmp = Path(tempfile.mkdtemp(dir=base.parent, prefix=f".{base.name}.partial-"))
        self._published = list(kept)
        try:
            try:
                yield tmp
            except BaseException as e:
                if (tmp / PROFILE).is_file():  # written atomically: it exists only when complete
                    self._publish(tmp, [PROFILE])
                    self._write_manifest({**record, "complete": False, "error": f"{type(e).__name__}: {e}"})
                    print(f"attnprof: the profile is kept in {self.path / PROFILE}; once the problem below is fixed, "
                          f"`attnprof report {self.path}` writes the tables, figures and report from it",
                          file=sys.stderr)  # fmt: skip
                raise
            files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if not p.is_dir())
            self._publish(tmp, sorted(files, key=lambda f: f != PROFILE))
            self._write_manifest({**record, "complete": False})
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _publish(self, tmp: Path, files) -> None:
        """Move ``files`` (relative) from ``tmp`` into the run folder, one atomic rename each."""
        for name in files:
            target = self.path / name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / name, target)
            self._published.append(name)

    def finish(self, record: dict) -> dict:
        """Write the manifest: ``record``, the warnings the run printed, ``outputs`` (the files this run moved
        in, the manifest included) and ``complete``."""
        return self._write_manifest({**record, "complete": True})

    def _write_manifest(self, record: dict) -> dict:
        published = self._published
        record = {**record, "warnings": warnings_log.recorded(),
                  "outputs": sorted({*published, MANIFEST})}  # fmt: skip
        manifest = self.path / MANIFEST
        tmp = manifest.with_name(f".{MANIFEST}.tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, manifest)
        return record


def list_outputs(folder, paths) -> None:
    """Add files attnprof wrote into a run folder after its run (``attnprof plot``'s figures) to its manifest,
    so that they stay attnprof's: replaced by ``--overwrite`` and ``attnprof report``, never taken for a user's."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return
    root = folder.resolve()
    inside = [str(Path(p).resolve().relative_to(root)) for p in paths if root in Path(p).resolve().parents]
    record = json.loads(manifest.read_text())
    record["outputs"] = sorted({*record.get("outputs", []), *inside})
    tmp = manifest.with_name(f".{MANIFEST}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, manifest)


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
