"""The warnings a command prints, kept so that run.json and report.html show them too.

``attnprof`` prints every warning as one ``attnprof: warning: ...`` line; :func:`note` is called for
each, and :func:`recording` scopes the list to one command (nested commands, e.g. ``demo`` running
``run``, share the outer list). Outside a recording nothing is kept.
"""

from __future__ import annotations

from contextlib import contextmanager

_log: list[str] | None = None


@contextmanager
def recording():
    """Keep the warnings noted inside the block (the outer recording's list when one is active)."""
    global _log
    if _log is not None:
        yield _log
        return
    _log = []
    try:
        yield _log
    finally:
        _log = None


def note(message) -> None:
    """Record one printed warning (once: the same text twice says nothing new)."""
    text = str(message)
    if _log is not None and text not in _log:
        _log.append(text)


def recorded() -> list[str]:
    """The warnings recorded so far (a copy)."""
    return list(_log or [])
