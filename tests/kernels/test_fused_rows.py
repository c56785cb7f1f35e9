"""The fused CPU row kernel equals the eager row pass of the torch backend; its gene scatter, ``index_put_``."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

from attnprof.kernels import fused_rows
from helpers import skip_unless_built

ATOL = RTOL = 1e-5
THREADS = torch.get_num_threads()


@pytest.fixture(scope="module")
def built():
    if not fused_rows._enabled():
        pytest.skip("ATTNPROF_FUSED=0 is set")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        ok = fused_rows.available()
    skip_unless_built(ok, f"the fused CPU row kernel cannot be built here: {fused_rows._failed}")
    return fused_rows._module


def eager_rows(q, k, v):
    """Plain-torch reference (fp32), q already scaled: out, lse, entropy, row_max, colsum."""
    s = q @ k.transpose(1, 2)
    m = s.amax(-1, keepdim=True)
    p = torch.softmax(s, -1)
    z = torch.exp(s - m).sum(-1)
    log_z = z.log()
    entropy = log_z - (p * (s - m)).sum(-1)
    return p @ v, m[..., 0] + log_z, entropy, 1 / z, p.sum(1)


def make(H, n, D, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(H, n, D, generator=g) for _ in range(3))
    return q * (spread * D**-0.5), k, v


def check(got, want):
    names = ("out", "lse", "entropy", "row_max", "colsum")
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape and a.dtype == torch.float32, name
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m, name=name: f"{name}: {m}")


SHAPES = [
    (1, 1, 8), (1, 2, 9), (2, 7, 16), (3, 7, 13), (1, 8, 64), (4, 31, 24), (2, 65, 8), (5, 65, 33),
    (16, 65, 32), (1, 127, 40), (3, 129, 7), (8, 200, 48), (16, 300, 32), (2, 300, 64), (1, 513, 11),
]


@pytest.mark.parametrize("H,n,D", SHAPES)
def test_matches_eager(built, H, n, D):
    q, k, v = make(H, n, D, seed=H * 1000 + n + D)
    check(fused_rows.cell_rows(q, k, v), eager_rows(q, k, v))


def test_matches_eager_nicheformer(built):
    q, k, v = make(16, 1500, 32, seed=1)
    check(fused_rows.cell_rows(q, k, v), eager_rows(q, k, v))


@pytest.mark.parametrize("spread", [0.0, 8.0, 40.0])
def test_flat_and_peaked_rows(built, spread):
    """Uniform rows (all scores equal) and very peaked ones (exp underflows for most keys)."""
    q, k, v = make(4, 97, 16, seed=3, spread=spread)
    check(fused_rows.cell_rows(q, k, v), eager_rows(q, k, v))


@pytest.mark.parametrize("fast_exp", [True, False])
@pytest.mark.parametrize("rows", [1, 5, 32, 128])
def test_block_sizes_and_exp(built, rows, fast_exp):
    q, k, v = make(3, 150, 20, seed=4)
    check(fused_rows.cell_rows(q, k, v, rows=rows, fast_exp=fast_exp), eager_rows(q, k, v))


def test_mm_fallback(built):
    """Products through the dispatcher (at::mm_out) instead of at::cpu::mm_out on the same views: same results."""
    q, k, v = make(3, 70, 12, seed=5)
    built.set_force_mm(True)
    try:
        got = fused_rows.cell_rows(q, k, v, rows=32)
    finally:
        built.set_force_mm(False)
    check(got, eager_rows(q, k, v))


def test_noncontiguous_inputs(built):
    q, k, v = make(4, 50, 16, seed=6)
    qt, kt, vt = (x.transpose(0, 1).contiguous().transpose(0, 1) for x in (q, k, v))
    assert not qt.is_contiguous()
    check(fused_rows.cell_rows(qt, kt, vt), eager_rows(q, k, v))


def test_deterministic_across_threads(built):
    q, k, v = make(2, 400, 32, seed=7)  # 2 heads: several row-block tasks per head
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused_rows.cell_rows(q, k, v)
        torch.set_num_threads(2)
        two = fused_rows.cell_rows(q, k, v)
    finally:
        torch.set_num_threads(prev)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_exp_accuracy(built):
    x = torch.linspace(-86, 0, 200_001)
    ref = torch.exp(x.double())
    for fast in (True, False):
        rel = ((built.exp_check(x, fast).double() - ref) / ref).abs().max().item()
        assert rel < 1e-6, (fast, rel)


def test_env_disables(monkeypatch, built):
    monkeypatch.setenv("ATTNPROF_FUSED", "0")
    assert not fused_rows.available()
    monkeypatch.setenv("ATTNPROF_FUSED", "1")
    assert fused_rows.available()


def test_build_failure_warns_once(monkeypatch):
    import torch.utils.cpp_extension as ce

    def broken(*args, **kwargs):
        raise RuntimeError("Error building extension 'x': no compiler")

    monkeypatch.setenv("ATTNPROF_FUSED", "1")
    monkeypatch.setattr(fused_rows, "_module", None)
    monkeypatch.setattr(fused_rows, "_failed", None)
    monkeypatch.setattr(ce, "load", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not fused_rows.available()
        assert not fused_rows.available()
    assert len(caught) == 1 and "no compiler" in str(caught[0].message)
    with pytest.raises(RuntimeError, match="not available"):
        fused_rows.cell_rows(*make(1, 3, 4))


def test_built_once_per_environment_in_a_keyed_folder(built):
    """The real kernel: its library lies in this environment's folder, keyed by what changes the binary,
    and the next process (same environment) loads it without a build or a word."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from attnprof.kernels import cpp_build

    folder = Path(built.__file__).parent
    assert folder.parent == cpp_build.extensions_root() / cpp_build.environment_tag()
    key = json.loads((folder / "key.json").read_text())
    assert key == cpp_build.build_key(fused_rows._sources(), fused_rows._flags()[1], ["-fopenmp"])
    assert folder.name.endswith(cpp_build.key_hash(key))
    code = "from attnprof.kernels import fused_rows; assert fused_rows.available(); print(fused_rows._module.__file__)"
    env = {k: v for k, v in os.environ.items() if k != "ATTNPROF_FUSED"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "attnprof:" not in done.stderr, done.stderr  # no build, no lock message
    assert done.stdout.strip() == built.__file__


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_scatter_rows_add_equals_index_put_bit_for_bit(built, data):
    """The CPU gene scatter adds what ``index_put_`` with accumulate adds, bit for bit: any rows (distinct),
    slots (repeats too), strides of the sums and of the values, 2-D sums (``recv_count``) and 3-D blocks, on
    one thread or several."""
    from attnprof.kernels import reduce

    R, M, V = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 5)), data.draw(st.integers(1, 40))
    P = data.draw(st.integers(0, R))
    J = data.draw(st.integers(0, 60))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    rows = torch.randperm(R, generator=g)[:P]
    slots = torch.randint(V, (J,), generator=g)
    value = torch.randn(M, P, J, generator=g, dtype=torch.float64).transpose(0, 1)  # not contiguous
    start = torch.randn(R, V, M, generator=g, dtype=torch.float64).permute(0, 2, 1)  # sums with other strides
    two_d = data.draw(st.booleans())
    if two_d:
        start, value = start[:, 0], value[:, 0]
    want = start.clone()
    index = (rows.view(-1, 1, 1), torch.arange(M).view(-1, 1), slots) if not two_d else (rows.view(-1, 1), slots)
    want.index_put_(index, value, accumulate=True)
    got = start.clone()  # the same strides
    torch.set_num_threads(data.draw(st.sampled_from([1, 2])))
    try:
        reduce._scatter_add(got, rows, slots, value)
    finally:
        torch.set_num_threads(THREADS)
    assert torch.equal(got, want)


def test_gene_scatter_on_the_cpu_is_the_extensions(built, monkeypatch):
    """With the extension built, the CPU scatter dispatches no aten op (it is the C++ call); without it, the
    fallback is one ``index_put_``. Both add the same sums."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from attnprof.kernels import reduce

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    value = torch.arange(2 * 3 * 4, dtype=torch.float64).view(2, 3, 4)
    rows, slots = torch.tensor([3, 0]), torch.tensor([5, 1, 2, 7])
    sums = {}
    for fused in ("1", "0"):
        monkeypatch.setenv("ATTNPROF_FUSED", fused)
        t = torch.ones(4, 3, 8, dtype=torch.float64)
        with Ops() as ops:
            reduce._scatter_add(t, rows, slots, value)
        assert ("index_put_" in ops.names) == (fused == "0"), ops.names
        sums[fused] = t
    assert torch.equal(sums["1"], sums["0"])
