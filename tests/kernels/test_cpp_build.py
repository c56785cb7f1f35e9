"""Building attnprof's C++: a folder per environment and binary, a build that says why, a lock that outlives no owner.

The lock and keying logic is exercised on a one-line C++ library (it builds in well under a second), in
subprocesses as real runs would be; tests/test_fused_rows.py checks that the real kernel goes the same way.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time

import pytest

from attnprof.kernels import cpp_build

pytestmark = pytest.mark.skipif(cpp_build.fcntl is None, reason="the build lock needs POSIX flock")

TINY = {"tiny.cpp": b'extern "C" int attnprof_answer() { return 42; }\n'}
FLAGS = ["-O0"]

# The module alone (it needs only torch): the package's own imports would double each run's start-up time.
RUN = f"""
import ctypes, importlib.util, sys, time
spec = importlib.util.spec_from_file_location("attnprof_cpp_build", {cpp_build.__file__!r})
cpp_build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cpp_build)
src = {TINY!r}
if sys.argv[1] == "hold":  # take the lock as a build would, with torch's own lock file, and hang
    folder = cpp_build.extension_folder("attnprof_tiny", cpp_build.build_key(src, {FLAGS!r}, []))
    cpp_build.BuildLock(folder).__enter__()
    (folder / "lock").write_text("")
    print("holding", flush=True)
    time.sleep(600)
else:
    path = cpp_build.load_extension("attnprof_tiny", src, cflags={FLAGS!r}, ldflags=[], what="a test library",
                                    about="about 1 s", python_module=False)
    print(ctypes.CDLL(path).attnprof_answer(), flush=True)
"""

BUILDING = "attnprof: building a test library ("


def start(root, mode, python=sys.executable):
    env = {**os.environ, "ATTNPROF_EXTENSIONS_DIR": str(root)}
    return subprocess.Popen([python, "-c", RUN, mode], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def run(root, python=sys.executable):
    proc = start(root, "load", python)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and out.strip() == "42", err
    return err


@pytest.fixture
def watchdog():
    """Kill every process a test started if it is still running after 120 s (a stalled lock fails, never hangs)."""
    procs = []
    timer = threading.Timer(120, lambda: [p.kill() for p in procs if p.poll() is None])
    timer.start()
    yield procs
    timer.cancel()
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_first_build_says_why_and_the_next_run_only_loads(tmp_path):
    err = run(tmp_path)
    assert err.count(BUILDING + "first use in this environment), about 1 s, in ") == 1, err
    assert "attnprof: built a test library in " in err
    (folder,) = (tmp_path / cpp_build.environment_tag()).iterdir()
    lib = next(folder.glob("*.so"))
    before = lib.stat().st_mtime_ns
    assert run(tmp_path) == ""  # not a word, not a rebuild
    assert lib.stat().st_mtime_ns == before
    assert json.loads((folder / "key.json").read_text()) == cpp_build.build_key(TINY, FLAGS, [])


def test_a_killed_lock_owner_is_detected_and_the_waiting_run_proceeds_within_seconds(tmp_path, watchdog):
    run(tmp_path)  # built: the waiting run below only loads
    holder = start(tmp_path, "hold")
    watchdog.append(holder)
    assert holder.stdout.readline().strip() == "holding"
    waiter = start(tmp_path, "load")
    watchdog.append(waiter)
    host = socket.gethostname()
    assert waiter.stderr.readline().startswith(f"attnprof: waiting for process {holder.pid} on {host}, which is ")
    time.sleep(0.5)
    assert waiter.poll() is None  # it waits while the owner lives
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    killed = time.monotonic()
    out, err = waiter.communicate(timeout=60)
    assert time.monotonic() - killed < 10, "the run did not proceed within seconds of the owner's death"
    assert waiter.returncode == 0 and out.strip() == "42", err
    assert f"attnprof: cleared a build lock left by process {holder.pid} on {host}, which is gone" in err
    folder = next((tmp_path / cpp_build.environment_tag()).iterdir())
    assert not (folder / "lock").exists()  # torch's own lock file, which would stall torch's build forever
    assert (folder / cpp_build.LOCK_NAME).read_text() == ""  # released cleanly: the next run says nothing


def test_a_build_killed_before_it_finished_is_redone(tmp_path, watchdog):
    holder = start(tmp_path, "hold")  # dies holding the lock of a folder never built
    watchdog.append(holder)
    assert holder.stdout.readline().strip() == "holding"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    err = run(tmp_path)
    assert f"cleared a build lock left by process {holder.pid}" in err and BUILDING in err


def test_torchs_own_lock_left_alone_is_removed_with_a_message(tmp_path, capsys):
    """torch's FileBaton file (no pid) left by a build killed inside torch: whoever holds attnprof's lock
    removes it, since every process takes attnprof's lock before torch's."""
    folder = tmp_path / "ext"
    folder.mkdir()
    (folder / "lock").write_text("")
    with cpp_build.BuildLock(folder):
        assert not (folder / "lock").exists()
        assert json.loads((folder / cpp_build.LOCK_NAME).read_text())["pid"] == os.getpid()
    assert capsys.readouterr().err == f"attnprof: removed torch's build lock left by an interrupted build in {folder}\n"
    assert (folder / cpp_build.LOCK_NAME).read_text() == ""
    with cpp_build.BuildLock(folder):
        pass
    assert capsys.readouterr().err == ""


def second_environment(path):
    """A venv of its own (another ``sys.prefix``) that sees this environment's packages."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    python = path / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    ours = sysconfig.get_paths()["purelib"]
    os.makedirs(site, exist_ok=True)
    with open(os.path.join(site, "attnprof_test_parent.pth"), "w") as f:
        f.write(f"import site; site.addsitedir({ours!r})\n")
    return python


def test_two_environments_alternate_without_rebuilding_each_other(tmp_path):
    root = tmp_path / "cache"
    other = second_environment(tmp_path / "venv-b")
    first = [run(root), run(root, other)]
    assert all(err.count(BUILDING + "first use in this environment)") == 1 for err in first), first
    libs = sorted(root.glob("*/*/*.so"))
    assert len(libs) == 2 and libs[0].parent.parent != libs[1].parent.parent  # one folder per environment
    times = [lib.stat().st_mtime_ns for lib in libs]
    assert run(root) == "" and run(root, other) == ""  # alternating: not a word, not a rebuild
    assert [lib.stat().st_mtime_ns for lib in libs] == times


def test_the_key_holds_every_part_that_changes_the_binary(monkeypatch):
    base = cpp_build.build_key(TINY, FLAGS, [])
    assert cpp_build.key_hash(base) == cpp_build.key_hash(cpp_build.build_key(dict(TINY), list(FLAGS), []))
    changed = {
        "source": cpp_build.build_key({"tiny.cpp": TINY["tiny.cpp"] + b"\n"}, FLAGS, []),
        "flags": cpp_build.build_key(TINY, ["-O1"], []),
        "ldflags": cpp_build.build_key(TINY, FLAGS, ["-lm"]),
    }
    monkeypatch.setenv("CXX", "attnprof-no-such-compiler")
    changed["compiler"] = cpp_build.build_key(TINY, FLAGS, [])
    monkeypatch.setattr(cpp_build.torch, "__version__", "0.0.0")
    changed["torch"] = cpp_build.build_key(TINY, FLAGS, [])
    assert len({cpp_build.key_hash(k) for k in (base, *changed.values())}) == 1 + len(changed)
    assert {"source", "torch", "compiler", "flags", "python", "machine"} <= base.keys()


@pytest.mark.parametrize(
    "change, reason",
    [("source", "source changed"), ("torch", "torch changed"), ("compiler", "compiler changed"),
     ("python", "Python changed"), (None, "first use in this environment")],
)  # fmt: skip
def test_a_build_names_what_changed_since_the_last_one(tmp_path, change, reason):
    key = cpp_build.build_key(TINY, FLAGS, [])
    if change is not None:
        old = tmp_path / "attnprof_tiny-0000"
        old.mkdir()
        (old / "key.json").write_text(json.dumps({**key, change: "before"}))
    folder = tmp_path / f"attnprof_tiny-{cpp_build.key_hash(key)}"
    assert cpp_build.build_reason(folder, key) == reason
    folder.mkdir()
    (folder / "build.ninja").write_text("")
    assert cpp_build.build_reason(folder, key) == "an earlier build here did not finish or failed"
    (folder / "key.json").write_text(json.dumps(key))
    (folder / "attnprof_tiny.so").write_bytes(b"")
    assert cpp_build.build_reason(folder, key) is None


def test_the_cache_root_follows_the_environment_variables(monkeypatch, tmp_path):
    monkeypatch.delenv("ATTNPROF_EXTENSIONS_DIR", raising=False)
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cpp_build.extensions_root() == tmp_path / "xdg" / "attnprof" / "extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch"))
    assert cpp_build.extensions_root() == tmp_path / "torch" / "attnprof"
    monkeypatch.setenv("ATTNPROF_EXTENSIONS_DIR", str(tmp_path / "own"))
    assert cpp_build.extensions_root() == tmp_path / "own"
