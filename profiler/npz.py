"""Atomic ``.npz`` files without pickles: the file format of profiles and checkpoints."""

from __future__ import annotations

import os
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np


def write_npz(path: Path, arrays: dict[str, np.ndarray], compress: bool = True) -> None:
    """Write arrays to ``path`` atomically: a temporary file in the same folder, then a rename.

    A crash or an error leaves the previous file at ``path`` untouched (and no temporary file).
    Compressed at zlib's level 1, not ``np.savez_compressed``'s 6: float sums barely compress either way
    (measured on a 56 MB profile: 2.7 s against 11 s for 54 MB). ``compress=False`` writes
    faster still and about twice as large (for frequent, transient checkpoints).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    mode = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    try:
        with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", compression=mode, compresslevel=1) as z:
            for name, array in arrays.items():  # the layout np.savez writes, which np.load reads
                with z.open(name + ".npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
        os.chmod(tmp, _file_mode())  # mkstemp makes 0600; every other output follows the umask (0644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_npz(path: Path, what: str) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file (no pickles); a truncated or corrupted file raises ``ValueError``."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: np.array(data[k]) for k in data.files}
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise ValueError(f"{path} is not a readable {what} (truncated or corrupted?): {e}") from e


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
