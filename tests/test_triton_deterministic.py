"""The triton backend's deterministic mode and its per-head-dim configs (kernels/triton_options.py).

Deterministic mode launches every kernel with the config its prune keeps first for the launch's row
(head dim, operand width): never autotuned, so the summation order is a function of the shape alone;
the gene path sums repeated token ids by a fixed-order gather instead of ``index_add_`` (float atomics
on CUDA). Under the interpreter: equal to the reference within the contract, bit-identical twice.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attnprof.kernels import Target, build_plan, empty_sums, planned_stats
from attnprof.kernels import triton_forward as kf
from attnprof.kernels import triton_stats as ks
from attnprof.kernels.triton_options import triton_options

from helpers import assert_sums_close, spec_for
from test_triton import DEVICE, FP16, FP32, batch, both, out_tol
from test_triton import pytestmark  # noqa: F401

KERNELS = {"forward": (kf._forward_kernel, kf.FORWARD_CONFIGS, ("BLOCK_M", "BLOCK_N")),
           "columns": (ks._columns_kernel, ks.COLUMNS_CONFIGS, ("BLOCK_M", "BLOCK_N", "BLOCK_M_FMA")),
           "entries": (ks._entries_kernel, ks.ENTRIES_CONFIGS, ("BLOCK_M", "BLOCK_N"))}  # fmt: skip


@pytest.fixture
def never_tuned(monkeypatch):
    """Fail if any kernel would be benchmarked (autotuned)."""
    for kernel, _, _ in KERNELS.values():
        monkeypatch.setattr(kernel, "_bench", lambda *a, **k: pytest.fail("autotuned in deterministic mode"))


@pytest.mark.parametrize("dtype", [FP32, FP16], ids=["fp32", "fp16"])
def test_deterministic_mode_equals_reference(dtype, never_tuned):
    B, H, L, D = 5, 2, 70, 24
    q, k, v, padding, groups, tokens = batch(5, B, H, L, D, dtype)  # vocab 12: ids repeat within cells
    spec = spec_for(4, L, window=20, n_context=3)
    with triton_options(deterministic=True):
        (out, sums), (out_ref, ref) = both(q, k, v, padding, groups, tokens, spec)
    torch.testing.assert_close(out.float(), out_ref.float(), **out_tol(v))
    assert_sums_close(sums, ref, atol=1e-5, rtol=1e-5)


def run_layers(q, k, v, plan, spec, H, calls=2):
    sums = {name: x[None] for name, x in empty_sums(spec, H, device=DEVICE).items()}
    for _ in range(calls):
        out = planned_stats(q, k, v, plan, [Target(sums)], backend="triton")
    return out, sums


class FloatIndexAdds(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.index_add, torch.ops.aten.index_add_) and args[0].dtype == FP32:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_two_runs_give_bit_identical_sums_without_float32_index_add(never_tuned):
    B, H, L, D = 4, 2, 40, 16
    q, k, v, padding, groups, tokens = batch(9, B, H, L, D)
    tokens[0, :8] = torch.tensor([3, 3, 3, 5, 5, 3, 7, 7])  # ids repeated up to 4 times in a cell
    spec = spec_for(4, L, window=12, n_context=2)
    runs = []
    for _ in range(2):
        plan = build_plan(spec, groups, padding, tokens)  # a fresh plan: as another shard or rank would build it
        with triton_options(deterministic=True), FloatIndexAdds() as log:
            runs.append(run_layers(q, k, v, plan, spec, H))
        assert log.seen == []  # the repeated-id sums took the fixed-order gather
    (out_a, a), (out_b, b) = runs
    assert torch.equal(out_a, out_b)
    assert all(torch.equal(a[name], b[name]) for name in a)
    with FloatIndexAdds() as log:  # the default mode's path, for comparison: one float32 index_add_ per layer
        _, c = run_layers(q, k, v, build_plan(spec, groups, padding, tokens), spec, H, calls=1)
    assert len(log.seen) == 1
    with triton_options(deterministic=True):
        _, one = run_layers(q, k, v, plan, spec, H, calls=1)
    assert_sums_close({n: x[0] for n, x in c.items()}, {n: x[0] for n, x in one.items()}, atol=1e-6, rtol=1e-6)


def test_occurrences_gather_every_token_of_a_pair_once():
    B, H, L = 3, 2, 10
    _, _, _, padding, groups, tokens = batch(1, B, H, L, 16)
    tokens[0] = torch.tensor([1, 1, 1, 2, 1, 4, 4, 0, 0, 9])
    plan = build_plan(spec_for(4, L), groups, padding, tokens)
    at, real = ks.occurrences(plan)
    x = torch.randn(plan.n_counted * L, H, dtype=torch.float64)
    expected = torch.zeros(plan.pair_cell.numel(), H, dtype=torch.float64).index_add_(
        0, plan.gene_pairs, x[plan.gene_src])
    torch.testing.assert_close((x[at] * real.double()).sum(1), expected, atol=1e-12, rtol=0)
    assert int(real.sum()) == plan.gene_src.numel()


@pytest.mark.parametrize("name", list(KERNELS))
def test_configs_are_pruned_per_head_dim_before_tuning(name):
    """Each kernel's prune keeps exactly its table's row for the launch (in order; the first is pinned):
    head dims 8..32 read the 32 row, 33..64 the 64 row, 65..128 the 128 row; fp32 operands their own."""
    kernel, table, names = KERNELS[name]
    every = kf.table_configs(table, names)
    prune = kernel.early_config_prune
    assert {key[0] for key in table} == {32, 64, 128} and {key[1] for key in table} == {False, True}
    for D in (8, 24, 32, 40, 64, 100, 128):
        for dot_prec in ("native", "tf32x3", "ieee"):
            row = table[kf.table_key(kf.block_d(D), dot_prec)]
            kept = prune(every, {}, BLOCK_D=kf.block_d(D), DOT_PREC=dot_prec)
            assert [kf._config_id(c, names) for c in kept] == [tuple(r) for r in row]
    assert kf.table_key(16, "native") == (32, False) and kf.table_key(128, "fp16") == (128, True)
    odd = [every[0].__class__({n: 8 for n in names}, num_warps=1)]  # a list without any row (forced tiles)
    assert prune(odd, {}, BLOCK_D=32, DOT_PREC="native") == odd


def test_pinned_config_is_the_first_kept(monkeypatch):
    kernel, table, names = KERNELS["forward"]
    monkeypatch.setattr(kernel, "configs", kf.table_configs(table, names))
    pinned = kf.pinned_config(kernel, (), dict(BLOCK_D=64, DOT_PREC="tf32x3"))
    assert kf._config_id(pinned, names) == tuple(table[64, True][0])
