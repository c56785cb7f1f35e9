"""Build and load attnprof's C++ extensions: one folder per environment and binary, a lock that survives a crash.

:func:`load_extension` compiles C++ sources with ``torch.utils.cpp_extension.load`` into a folder keyed by
everything that changes the binary, and loads the result:

- **The key**: the sources' contents, torch's version, git commit and C++ ABI flag, the compiler (its path
  and ``--version``), the flags, the Python version and the machine. Anything else gives another folder, so
  torch's own versioning never renames the library and nothing is rebuilt in turn.
- **The folder**: ``<root>/<env>/<name>-<key>``, where ``<env>`` is a hash of the environment's
  ``sys.prefix``: two environments (two venvs, two clones) never share a folder, and never rebuild each
  other's kernel. ``<root>`` is ``$ATTNPROF_EXTENSIONS_DIR``, else ``$TORCH_EXTENSIONS_DIR/attnprof``, else
  ``$XDG_CACHE_HOME/attnprof/extensions`` (``~/.cache/attnprof/extensions``).
- **Every build says so** on stderr with its reason (first use in this environment, source changed, torch
  changed, ...) before it starts, and how long it took after.
- **The lock**: ``attnprof.lock`` in the folder, an exclusive ``flock`` (released by the kernel when its
  holder dies, however it dies) holding the owner's pid and host. A process that finds a record left by an
  owner that is gone says so, clears it, and removes torch's own lock file (``lock``, which holds no pid
  and would make every later build wait forever), then proceeds. A process that waits for a live owner says
  who it waits for.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

try:  # POSIX; elsewhere builds run without attnprof's lock (torch's own still applies)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_NAME = "attnprof.lock"
KEY_NAME = "key.json"
#: seconds between two tries of a lock held by a live process
POLL_S = 0.2
#: a wait shorter than this (another process loading the built library) goes unannounced
QUIET_WAIT_S = 1.0


def extensions_root() -> Path:
    """Where every environment's folders live (see the module doc)."""
    own = os.environ.get("ATTNPROF_EXTENSIONS_DIR")
    if own:
        return Path(own)
    torch_dir = os.environ.get("TORCH_EXTENSIONS_DIR")
    if torch_dir:
        return Path(torch_dir) / "attnprof"
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "attnprof" / "extensions"


def environment_tag() -> str:
    """This environment's folder name: the Python version and a hash of ``sys.prefix``."""
    prefix = os.path.realpath(sys.prefix)
    return f"py{sys.version_info[0]}{sys.version_info[1]}-{hashlib.sha256(prefix.encode()).hexdigest()[:12]}"


_compiler_cache: dict[str, dict[str, str]] = {}


def compiler() -> dict[str, str]:
    """The C++ compiler torch will call (``$CXX`` or ``c++``): its resolved path and first ``--version`` line."""
    cxx = os.environ.get("CXX", "c++")
    if cxx not in _compiler_cache:
        path = shutil.which(cxx)
        version = "unknown"
        try:
            done = subprocess.run([path or cxx, "--version"], capture_output=True, text=True, timeout=30)
            version = (done.stdout.strip().splitlines() or ["unknown"])[0] if done.returncode == 0 else "unknown"
        except (OSError, subprocess.SubprocessError):
            pass
        _compiler_cache[cxx] = {"path": os.path.realpath(path) if path else cxx, "version": version}
    return _compiler_cache[cxx]


def build_key(sources: dict[str, bytes], cflags: list[str], ldflags: list[str]) -> dict:
    """Everything that changes the binary, by part (so that a rebuild can say which part changed)."""
    return {
        "source": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(sources.items())},
        "torch": f"{torch.__version__} ({torch.version.git_version}, cxx11 abi "
        f"{int(bool(torch._C._GLIBCXX_USE_CXX11_ABI))})",
        "compiler": compiler(),
        "flags": {"cflags": list(cflags), "ldflags": list(ldflags)},
        "python": f"{platform.python_implementation()} {sys.version.split()[0]} ({sys.implementation.cache_tag})",
        "machine": platform.machine(),
    }


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def build_reason(folder: Path, key: dict) -> str | None:
    """Why ``folder`` needs a build, or None when its library is built for ``key``."""
    name = folder.name.rsplit("-", 1)[0]
    if (folder / KEY_NAME).is_file() and any(folder.glob("*.so")):
        return None
    if folder.is_dir() and any(p.name != LOCK_NAME for p in folder.iterdir()):
        return "an earlier build here did not finish or failed"
    earlier = []
    for other in folder.parent.glob(f"{name}-*/{KEY_NAME}"):
        try:
            earlier.append((other.stat().st_mtime, json.loads(other.read_text())))
        except (OSError, ValueError):
            continue
    if not earlier:
        return "first use in this environment"
    last = max(earlier, key=lambda e: e[0])[1]
    changed = [part for part in key if last.get(part) != key[part]]
    names = {"source": "source changed", "torch": "torch changed", "compiler": "compiler changed",
             "flags": "flags changed", "python": "Python changed", "machine": "machine changed"}  # fmt: skip
    return ", ".join(names.get(p, f"{p} changed") for p in changed) or "another build of the same key"


def _say(message: str) -> None:
    print(f"attnprof: {message}", file=sys.stderr, flush=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class BuildLock:
    """An exclusive lock on a build folder that names its owner and outlives no owner (see the module doc)."""

    def __init__(self, folder: Path, what: str = "a C++ extension"):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self.fd: int | None = None

    def _record(self) -> dict | None:
        try:
            text = os.pread(self.fd, 4096, 0).decode(errors="replace").strip()
            return json.loads(text) if text else None
        except (OSError, ValueError):
            return {"pid": "?", "host": "?"}

    def __enter__(self) -> BuildLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        if fcntl is None:  # pragma: no cover
            return self
        told, start = False, time.monotonic()
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told and time.monotonic() - start >= QUIET_WAIT_S:  # a load takes less: no word
                    owner = self._record() or {}
                    _say(f"waiting for process {owner.get('pid', '?')} on {owner.get('host', '?')}, which is "
                         f"building {self.what} in {self.folder}")  # fmt: skip
                    told = True
                time.sleep(POLL_S)
        left = self._record()
        if left:  # its owner never released it: killed while building
            pid, host = left.get("pid", "?"), left.get("host", "?")
            gone = host == socket.gethostname() and isinstance(pid, int) and not _alive(pid)
            _say(f"cleared a build lock left by process {pid} on {host}, which "
                 f"{'is gone' if gone else 'no longer holds it'}; proceeding in {self.folder}")  # fmt: skip
        baton = self.folder / "lock"  # torch's FileBaton: it holds no pid, and would stall torch's build forever
        if baton.exists():  # every process takes this lock before torch's: one left now is stale
            baton.unlink()
            if not left:
                _say(f"removed torch's build lock left by an interrupted build in {self.folder}")
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode(), 0)
        return self

    def __exit__(self, *exc) -> None:
        try:
            os.ftruncate(self.fd, 0)  # a clean release leaves no record
        finally:
            if fcntl is not None:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def extension_folder(name: str, key: dict) -> Path:
    """This environment's build folder for ``name`` built as ``key`` says."""
    return extensions_root() / environment_tag() / f"{name}-{key_hash(key)}"


def load_extension(name: str, sources: dict[str, bytes], *, cflags: list[str], ldflags: list[str],
                   what: str = "a C++ extension", about: str = "about 40 s", python_module: bool = True):  # fmt: skip
    """Build (when needed) and load ``sources`` (file name -> contents) as the Python module ``name_<key>``.

    Returns the module (``python_module=False``: the path of the shared library, loaded into the process);
    raises what ``torch.utils.cpp_extension.load`` raises when the build fails.
    """
    from torch.utils.cpp_extension import load

    key = build_key(sources, cflags, ldflags)
    folder = extension_folder(name, key)
    digest = key_hash(key)
    with BuildLock(folder, what):
        reason = build_reason(folder, key)
        paths = []
        for file, data in sorted(sources.items()):
            path = folder / "src" / file
            if not path.is_file() or path.read_bytes() != data:  # unchanged files keep their time: ninja stays idle
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            paths.append(str(path))
        if reason is not None:
            _say(f"building {what} ({reason}), {about}, in {folder}")
            start = time.monotonic()
        module = load(name=f"{name}_{digest}", sources=paths, extra_cflags=cflags, extra_ldflags=ldflags,
                      build_directory=str(folder), with_cuda=False, is_python_module=python_module,
                      verbose=False)  # fmt: skip
        if reason is not None:
            tmp = folder / f"{KEY_NAME}.tmp"
            tmp.write_text(json.dumps(key, indent=1, sort_keys=True))
            tmp.replace(folder / KEY_NAME)
            _say(f"built {what} in {time.monotonic() - start:.0f} s")
    return module
