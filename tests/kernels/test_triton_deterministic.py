"""The triton backend's deterministic mode and its per-head-dim configs (kernels/triton_options.py).

Deterministic mode launches every kernel with the config its prune keeps first for the launch's row
(head dim, operand width): never autotuned, so the summation order is a function of the shape alone;
the gene path sums repeated token ids by a fixed-order gather instead of ``index_add_`` (float atomics
on CUDA). Under the interpreter: equal to the reference within the contract, bit-identical twice.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attnprof.kernels import Target, build_plan, empty_sums, planned_stats
from attnprof.kernels import triton_common as kc
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
        """Float index_add_ and index_put_(accumulate=True) whose index repeats: CUDA atomics adding several
        values into one entry, in an order that can change from run to run."""
        kwargs = kwargs or {}
        packet = func.overloadpacket
        index = None
        if packet in (torch.ops.aten.index_add, torch.ops.aten.index_add_):
            index = args[2]
        accumulate = args[3] if len(args) > 3 else kwargs.get("accumulate", False)
        if packet in (torch.ops.aten.index_put, torch.ops.aten.index_put_) and accumulate:
            index = args[1][0]
        if index is not None and args[0].dtype.is_floating_point and index.unique().numel() < index.numel():
            self.seen.append(str(func))
        return func(*args, **kwargs)


def test_two_runs_give_bit_identical_sums_without_float_atomics(never_tuned):
    B, H, L, D = 4, 2, 40, 16
    q, k, v, padding, groups, tokens = batch(9, B, H, L, D)
    tokens[0, :8] = torch.tensor([3, 3, 3, 5, 5, 3, 7, 7])  # ids repeated up to 4 times in a cell
    spec = spec_for(4, L, window=12, n_context=2)
    runs = []
    for _ in range(2):
        plan = build_plan(spec, groups, padding, tokens)  # a fresh plan: as another shard or rank would build it
        with triton_options(deterministic=True), FloatIndexAdds() as log:
            runs.append(run_layers(q, k, v, plan, spec, H))
        assert log.seen == []  # the repeated-id sums took the fixed-order gather, not an atomic scatter
    (out_a, a), (out_b, b) = runs
    assert torch.equal(out_a, out_b)
    assert all(torch.equal(a[name], b[name]) for name in a)
    with FloatIndexAdds() as log:  # the default mode's path, for comparison: one accumulating float32 scatter per layer
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
    every = kc.table_configs(table, names)
    prune = kernel.early_config_prune
    assert {key[0] for key in table} == {32, 64, 128} and {key[1] for key in table} == {False, True}
    for D in (8, 24, 32, 40, 64, 100, 128):
        for dot_prec in ("native", "tf32x3", "ieee"):
            row = table[kc.table_key(kf.block_d(D), dot_prec)]
            kept = prune(every, {}, BLOCK_D=kf.block_d(D), DOT_PREC=dot_prec)
            assert [kc._config_id(c, names) for c in kept] == [tuple(r) for r in row]
    assert kc.table_key(16, "native") == (32, False) and kc.table_key(128, "fp16") == (128, True)
    odd = [every[0].__class__({n: 8 for n in names}, num_warps=1)]  # a list without any row (forced tiles)
    assert prune(odd, {}, BLOCK_D=32, DOT_PREC="native") == odd


def test_pinned_config_is_the_first_kept(monkeypatch):
    kernel, table, names = KERNELS["forward"]
    monkeypatch.setattr(kernel, "configs", kc.table_configs(table, names))
    pinned = kc.pinned_config(kernel, (), dict(BLOCK_D=64, DOT_PREC="tf32x3"))
    assert kc._config_id(pinned, names) == tuple(table[64, True][0])


def test_spill_data_drops_spilling_configs(monkeypatch):
    """The prune reads kernels/triton_spills.py for the launch's GPU: configs that spilled are dropped;
    for a policy checked on one config only (the non-default fp32 ones), that one is kept; with every
    config spilling, the least spilling; on a GPU without data (or none), the whole row."""
    from attnprof.kernels import triton_spills

    rows = [(128, 128, 4, 3), (128, 64, 4, 3), (64, 64, 4, 3)]
    monkeypatch.setattr(triton_spills, "CHECKED", {
        ("sm_80", "kernel 1", 32, "native", rows[0]): 88, ("sm_80", "kernel 1", 32, "native", rows[1]): 0,
        ("sm_80", "kernel 1", 32, "native", rows[2]): 0, ("sm_80", "kernel 1", 32, "ieee", rows[0]): 900,
        ("sm_80", "kernel 1", 32, "ieee", rows[1]): 0, ("sm_80", "kernel 1", 64, "native", rows[0]): 40,
        ("sm_80", "kernel 1", 64, "native", rows[1]): 20,
    })  # fmt: skip
    assert kc.spill_free("kernel 1", rows, 32, "native", "sm_80") == rows[1:]
    assert kc.spill_free("kernel 1", rows, 32, "ieee", "sm_80") == [rows[1]]
    assert kc.spill_free("kernel 1", rows, 64, "native", "sm_80") == [rows[1]]
    assert kc.spill_free("kernel 1", rows, 32, "native", "sm_90a") == rows
    assert kc.spill_free("kernel 1", rows, 32, "native", None) == rows


def test_the_checked_tables_have_a_spill_free_first_config():
    """For every kernel, head dim (32, 64, 128), arch (sm_80, sm_90a) and precision the spill check
    covered, the config a launch takes first compiled without spills (benches/results/spills.json)."""
    from attnprof.kernels.triton_spills import CHECKED

    assert CHECKED, "run python benches/sass_counts.py --spills"
    for name, (_, table, _) in KERNELS.items():
        name = {"forward": "kernel 1", "columns": "column pass", "entries": "entries"}[name]
        for (head_dim, wide), rows in table.items():
            for arch in ("sm_80", "sm_90a"):
                for prec in ("tf32x3", "tf32", "ieee", "bf16", "fp16") if wide else ("native",):
                    first = kc.spill_free(name, rows, head_dim, prec, arch)[0]
                    assert CHECKED[arch, name, head_dim, prec, tuple(first)] == 0, (name, head_dim, prec, arch, first)


def test_pinned_kernel1_compiles_without_spills_for_sm90():
    """Compiled again now (ptxas -v on Triton's PTX for sm_90a): kernel 1's first config at head dims 32,
    64 and 128, fp16 and fp32 tf32x3 inputs. All kernels, policies and sm_80: ``python
    benches/sass_counts.py --spills --pinned`` (slow)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    code = ("import sys, json; sys.path.insert(0, 'benches'); import sass_counts as s; "
            "print(json.dumps(s.pinned_spills(archs=('sm_90a',), kernels=('kernel 1',), policies=('native', 'tf32x3'), "
            "progress=lambda *a: None)))")  # fmt: skip
    root = Path(__file__).parents[2]
    run = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(run.stdout.strip().splitlines()[-1])
    assert {(r["head_dim"], r["dtype"]) for r in rows} >= {(d, t) for d in (32, 64, 128) for t in ("fp16", "fp32")}
    assert [r for r in rows if r["spill_stores"] or r["spill_loads"]] == []


class MatmulDtypes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.seen.append((func.overloadpacket.__name__, args[-2].dtype if "addmm" in str(func) else args[0].dtype,
                              tuple(args[-1].shape)))  # fmt: skip
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("deterministic", [False, True])
def test_gene_tokens_go_straight_into_the_features(deterministic):
    """The column pass's per-position values are added straight into the (cell, gene) features (default
    mode: one accumulating scatter, no per-pair ``[U, H]`` array; deterministic: the fixed-order gather);
    the group sums stay float64 matmuls (a batching-independent run sum, tests/test_merge.py). Equal to
    the reference within the contract, with ids repeated up to 4 times."""
    B, H, L, D = 4, 2, 40, 16
    q, k, v, padding, groups, tokens = batch(9, B, H, L, D)
    tokens[0, :8] = torch.tensor([3, 3, 3, 5, 5, 3, 7, 7])
    spec = spec_for(4, L, window=12, n_context=2)
    plan = build_plan(spec, groups, padding, tokens)
    run_layers(q, k, v, plan, spec, H, calls=1)  # the plan's first call derives its indices
    with triton_options(deterministic=deterministic), MatmulDtypes() as log, FloatIndexAdds() as adds:
        _, sums = run_layers(q, k, v, plan, spec, H, calls=1)
    gene_mms = [m for m in log.seen if m[0] == "mm"]
    assert gene_mms and all(dtype == torch.float64 for _, dtype, _ in gene_mms), log.seen
    assert not any("index_add" in op for op in adds.seen)  # no scatter into per-pair values
    assert len(adds.seen) == (0 if deterministic else 1)  # default: one accumulating scatter into the features
    from attnprof.kernels import attention_stats

    _, ref = attention_stats(q, k, v, spec=spec, groups=groups, key_padding_mask=padding, tokens=tokens,
                             backend="reference")  # fmt: skip
    assert_sums_close({n: x[0] for n, x in sums.items()}, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("deterministic", [False, True])
def test_gene_tokens_in_several_chunks_of_genes(monkeypatch, deterministic):
    """The reduction's gene features in chunks of 3 genes (a ragged last one): each chunk takes its own
    tokens on the token path; the sums equal the reference."""
    from attnprof.kernels import attention_stats, features

    B, H, L, D = 4, 2, 24, 16
    q, k, v, padding, groups, tokens = batch(13, B, H, L, D)
    tokens[0, :6] = torch.tensor([3, 3, 9, 5, 9, 3])
    spec = spec_for(4, L, window=8, n_context=2)
    counted = int((groups >= 0).sum())
    monkeypatch.setattr(features, "GENE_CHUNK", 3 * counted * H)
    plan = build_plan(spec, groups, padding, tokens)
    assert plan.genes.numel() > 3 and plan.genes.numel() % 3
    with triton_options(deterministic=deterministic):
        _, sums = run_layers(q, k, v, plan, spec, H, calls=2)
    kw = dict(spec=spec, groups=groups, key_padding_mask=padding, tokens=tokens, backend="reference")
    _, ref = attention_stats(q, k, v, **kw)
    assert_sums_close({n: x[0] / 2 for n, x in sums.items()}, ref, atol=1e-5, rtol=1e-5)  # two calls: all twice
