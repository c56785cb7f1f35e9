"""Pickles read as data: a restricted unpickler that admits only plain containers, strings and numbers.

Geneformer ships its token and gene median dictionaries as pickles, and unpickling can run any code the
file names. Without ``--trust-checkpoint`` such files are read by :func:`load_plain`, which refuses any
global but the few that rebuild plain values (sets, ordered dicts, numpy scalars and their dtypes); with
it, by :mod:`pickle` itself.
"""

from __future__ import annotations

import collections
import pickle
import re

import numpy as np

#: numpy's scalar reconstructor (numpy 2 moved ``numpy.core`` to ``numpy._core``).
NUMPY_SCALAR = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
#: (module, name) -> object: the globals plain data needs (numpy 1 and 2 spell the scalar's module apart).
PLAIN_GLOBALS = {
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "scalar"): NUMPY_SCALAR,
    ("numpy._core.multiarray", "scalar"): NUMPY_SCALAR,
}


class NotPlainData(pickle.UnpicklingError):
    """The pickle names a global that is not plain data (``.found`` says which)."""

    def __init__(self, found: str):
        super().__init__(f"pickled global {found} is not plain data")
        self.found = found


class UntrustedPickle(ValueError):
    """A pickle that would run code, read without trust: the message names the global and the flag."""


def refused_global(error: Exception) -> str:
    """`` (e.g. module.Name)``: the global a ``torch.load(weights_only=True)`` refusal names, or "" if none."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)|but got <class '([^']+)'>", str(error))
    return f" (e.g. {found.group(1) or found.group(2)})" if found else ""


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return PLAIN_GLOBALS[(module, name)]
        except KeyError:
            raise NotPlainData(f"{module}.{name}") from None


def load_plain(path, what: str, trust: bool = False):
    """The object pickled in ``path``: plain data only unless ``trust`` (the file's code may then run)."""
    with open(path, "rb") as f:
        if trust:
            return pickle.load(f)
        try:
            return _PlainUnpickler(f).load()
        except NotPlainData as e:
            raise UntrustedPickle(
                f"{path} ({what}) holds a pickled {e.found}, not plain data (dicts, lists, strings, numbers): "
                f"reading it would run code from the file; if you trust the file, pass --trust-checkpoint"
            ) from None
