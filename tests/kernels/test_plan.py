"""The batch plan, and every labeling of a plan from one attention pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import attnprof
from attnprof.kernels import StatsSpec, Target, attention_stats, build_plan, empty_sums, planned_stats
from attnprof.kernels.blocked import batch_rows

from helpers import assert_sums_close, random_batch, spec_for


def hand_batch():
    """Four cells of L = 6: a full one, one with a single real token, one with padding inside the
    window, one of an id-less panel; groups (0, -1, 0, 2) so group 1 is empty and cell 1 uncounted."""
    padding = torch.tensor(
        [
            [False] * 6,
            [False] + [True] * 5,
            [False, True, False, False, True, True],
            [False, False, False, True, True, True],
        ]
    )
    tokens = torch.tensor(
        [
            [5, 2, 7, 2, 9, 0],
            [7, 0, 0, 0, 0, 0],
            [2, 5, 9, 7, 5, 5],
            [1, 3, 1, 0, 0, 0],
        ]
    )
    labelings = torch.tensor([[0, -1, 0, 2], [2, 0, -1, 0]])
    spec = StatsSpec(n_groups=3, window=3, vocab_size=10, panel=(7, 2, 4), n_context=2)
    return spec, labelings, padding, tokens


def test_plan_fields_by_hand():
    spec, labelings, padding, tokens = hand_batch()
    plan = build_plan(spec, labelings, padding, tokens)
    assert (plan.B, plan.L, plan.n_labelings, plan.window) == (4, 6, 2, 3)
    assert plan.lengths.tolist() == [6, 1, 3, 3]
    assert plan.cu_seqlens.tolist() == [0, 6, 7, 10, 13] and plan.cu_seqlens.dtype == torch.int32
    assert plan.max_len == 6
    assert plan.positions.tolist() == [0, 1, 2, 3, 4, 5, 0, 0, 2, 3, 0, 1, 2]
    assert plan.token_index.tolist() == [0, 1, 2, 3, 4, 5, 6, 12, 14, 15, 18, 19, 20]
    # cell 1 is counted by labeling 1 only, cell 2 by labeling 0 only: every cell is counted somewhere
    assert plan.counted.tolist() == [0, 1, 2, 3]
    expected_onehot = torch.zeros(4, 6, dtype=torch.float64)
    for lab in range(2):
        for c in range(4):
            g = int(labelings[lab, c])
            if g >= 0:
                expected_onehot[c, lab * 3 + g] = 1
    torch.testing.assert_close(plan.onehot, expected_onehot)
    assert plan.n_window.tolist() == [3, 1, 2, 3]
    assert plan.host["window_prefix"] == [True, True, False, True]
    assert plan.n_context.tolist() == [2, 1, 1, 2]
    # the batch's gene axis: ids of real tokens of counted cells only
    assert plan.genes.tolist() == [0, 1, 2, 3, 5, 7, 9]  # cell 2's padded 5s are not held
    pairs = {(int(c), int(plan.genes[g])) for c, g in zip(plan.pair_cell, plan.pair_gene)}
    # cell 0 holds 5, 2, 7, 2, 9, 0 (id 2 twice: one pair); cell 2 holds 2, 9, 7 at its real positions
    assert pairs == {(0, 5), (0, 2), (0, 7), (0, 9), (0, 0), (1, 7), (2, 2), (2, 9), (2, 7), (3, 1), (3, 3)}
    assert plan.pair_gene.tolist() == sorted(plan.pair_gene.tolist())
    # panel (7, 2, 4): id 4 is absent everywhere; cell 3 holds none of the panel
    assert plan.panel_pos.tolist() == [[1, 2, 3], [0, -1, -1], [0, 3, -1], [-1, -1, -1]]
    assert batch_rows(plan).panel_at.tolist() == [[1, 2, 3], [0, -1, -1], [0, 2, -1], [-1, -1, -1]]  # the torch backend's view
    assert plan.panel_member[0].tolist() == [[0, 1, 0], [1, 0, 1], [0, 0, 0]]
    assert plan.host["panel_count"] == [3, 1, 2, 0]
    # counts of both labelings: group 1 is empty in labeling 0
    assert plan.counts["cells"].tolist() == [[2, 0, 1], [2, 0, 1]]
    assert plan.counts["pos_count"][0, 1].abs().sum() == 0
    pc = plan.counts["pos_count"]
    assert pc[1, 0, 0, 0] == 2 and pc[1, 0, 1, 1] == 1  # cells 1 (one token) and 3 in group 0 of labeling 1
    gi = {int(t): i for i, t in enumerate(plan.genes)}
    assert plan.counts["recv_count"][1, 0, gi[7]] == 1 and plan.counts["recv_count"][1, 0, gi[1]] == 1
    assert plan.counts["recv_count"][0, 0, gi[2]] == 2  # cells 0 and 2 hold id 2 (twice in cell 0: once)
    # pair counts: panel id 4 never present; (7, 2) in cells 0 and 2
    assert plan.counts["pair_count"][0, 0].tolist() == [[2, 2, 0], [2, 2, 0], [0, 0, 0]]
    assert plan.counts["pair_count"][:, :, 2].abs().sum() == 0


def test_plan_without_counted_cells_or_genes():
    spec = StatsSpec(n_groups=2, window=4)
    plan = build_plan(spec, torch.tensor([-1, -1]), shape=(2, 3))
    assert plan.n_counted == 0 and plan.onehot.shape == (0, 2)
    assert plan.genes.numel() == 0 and plan.counts["cells"].tolist() == [[0, 0]]
    q = k = v = torch.randn(2, 2, 3, 8)
    sums = empty_sums(spec, 2)
    out = planned_stats(q, k, v, plan, [Target({n: s[None] for n, s in sums.items()}, slice(0, 1))], backend="torch")
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert all(s.abs().sum() == 0 for s in sums.values())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(labelings=torch.zeros(2, 3, dtype=torch.long)), r"shape \[B\] = \[4\] per labeling"),
        (dict(labelings=torch.tensor([[0, 0, 0, 3]])), r"group codes \[3\] are out of range"),
        (dict(tokens=None), "pass tokens"),
    ],
)
def test_plan_refuses_bad_batches(kwargs, message):
    spec, labelings, padding, tokens = hand_batch()
    args = {**dict(labelings=labelings, key_padding_mask=padding, tokens=tokens), **kwargs}
    with pytest.raises(ValueError, match=message):
        build_plan(spec, **args)


def test_planned_stats_refuses_another_batch():
    spec, labelings, padding, tokens = hand_batch()
    plan = build_plan(spec, labelings, padding, tokens)
    q = torch.randn(4, 2, 5, 8)
    with pytest.raises(ValueError, match="the batch plan is for 4 cells of 6 positions"):
        planned_stats(q, q, q, plan, [], backend="torch")


def separate(backend, q, k, v, padding, tokens, spec, labelings):
    return [
        attention_stats(q, k, v, spec=spec, groups=lab, key_padding_mask=padding, tokens=tokens, backend=backend)
        for lab in labelings
    ]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 6),
    H=st.integers(1, 3),
    L=st.integers(1, 80),
    G=st.integers(1, 3),
    N=st.integers(0, 5),
    backend=st.sampled_from(["torch", "reference"]),
    panel=st.sampled_from([(), (1, 3, 4), (11, 0)]),
    wide=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_all_labelings_at_once_equal_separate_calls(B, H, L, G, N, backend, panel, wide, seed):
    """N + 1 labelings from one pass == one call per labeling (to rounding: the same per-cell values
    summed over another set of cells), counts exactly; on the full gene axis and a compact one."""
    q, k, v, padding, groups, tokens = random_batch(seed, B, H, L, 16, G)
    g = torch.Generator().manual_seed(seed)
    labelings = torch.stack([groups, *(torch.randint(-1, G, (B,), generator=g) for _ in range(N))])
    spec = spec_for(G, L, window=L + 3 if wide else max(1, L // 3), panel=panel)  # wide: W > L
    plan = build_plan(spec, labelings, padding, tokens)
    full = {n: torch.zeros(N + 1, *s.shape, dtype=torch.float64) for n, s in empty_sums(spec, H).items()}
    # as the recorder keeps permutations: no sums of squares, only the batch's genes (reversed)
    compact = {n: t[1:].clone() for n, t in full.items() if not n.endswith("_sq")}
    V = plan.genes.numel()
    for n in ("recv_sum", "recv_count"):
        compact[n] = compact[n][..., :V].clone()
    slots = torch.arange(V - 1, -1, -1)
    out = planned_stats(q, k, v, plan, [Target(full), Target(compact, slice(1, None), slots)], backend=backend)
    for i, (out_i, expected) in enumerate(separate(backend, q, k, v, padding, tokens, spec, labelings)):
        torch.testing.assert_close(out, out_i, atol=1e-5, rtol=1e-5)  # an uncounted cell: SDPA, not the row pass
        assert_sums_close({n: t[i] for n, t in full.items()}, expected, atol=1e-12, rtol=1e-12)
        if i:
            spread = {n: t[i - 1].clone() for n, t in compact.items()}
            for n in ("recv_sum", "recv_count"):
                spread[n] = torch.zeros_like(expected[n]).index_copy_(-1, plan.genes, compact[n][i - 1][..., slots])
            kept = {n: expected[n] for n in spread}
            assert_sums_close(spread, kept, atol=1e-12, rtol=1e-12)


@given(
    B=st.integers(1, 6),
    H=st.integers(1, 3),
    L=st.integers(1, 40),
    N=st.integers(0, 3),
    panel=st.sampled_from([(), (1, 3, 4)]),
    wide=st.booleans(),
    chunk=st.sampled_from([2**22, 7]),
    seed=st.integers(0, 2**31 - 1),
)
@settings(deadline=None, max_examples=30)
def test_tiled_sums_equal_separate_sums(B, H, L, N, panel, wide, chunk, seed):
    """Sums laid out by tiled_zeros (one matmul per target) == sums in separate tensors (one per sum),
    for a full and a compact permutation target, a window wider than the batch and chunked genes."""
    from attnprof.kernels import features, tiled_zeros

    q, k, v, padding, groups, tokens = random_batch(seed, B, H, L, 16, 2)
    g = torch.Generator().manual_seed(seed)
    labelings = torch.stack([groups, *(torch.randint(-1, 2, (B,), generator=g) for _ in range(N))])
    spec = spec_for(2, L, window=L + 3 if wide else max(1, L // 3), panel=panel)
    plan = build_plan(spec, labelings, padding, tokens)
    V = plan.genes.numel()
    shapes = {n: (N + 1, *s.shape) for n, s in empty_sums(spec, H).items()}
    compact = {n: (N, *s[1:-1], V) if n.startswith("recv") else (N, *s[1:]) for n, s in shapes.items() if not n.endswith("_sq")}
    slots = torch.arange(V - 1, -1, -1)
    sums = {}
    for layout in ("tiled", "separate"):
        alloc = tiled_zeros if layout == "tiled" else (lambda sh: {n: torch.zeros(s, dtype=torch.float64) for n, s in sh.items()})
        full, null = alloc(shapes), alloc(compact)
        targets = [Target(full), Target(null, slice(1, None), slots)]
        saved, features.GENE_CHUNK = features.GENE_CHUNK, chunk
        try:
            for _ in range(2):  # two layers on one plan: the plan's feature buffers are reused
                planned_stats(q, k, v, plan, targets, backend="torch")
        finally:
            features.GENE_CHUNK = saved
        tiled = [t.dense is not None for t in targets]
        assert tiled == [layout == "tiled"] * 2 or N == 0
        sums[layout] = full, null
    for a, b in zip(sums["tiled"], sums["separate"]):
        assert a.keys() == b.keys()
        for n in a:
            torch.testing.assert_close(a[n], b[n], atol=0, rtol=0, msg=n)  # the same dot products, bit for bit


def test_tiled_layout_is_checked():
    """Only sums that fill one buffer side by side, in the features' order, take the one-matmul path."""
    from attnprof.kernels.reduce import _tiled

    shapes = {"a": (2, 3, 4), "b": (2, 3, 2, 5)}
    buf = torch.zeros(2, 3, 14, dtype=torch.float64)
    a, b = buf[:, :, :4], buf[:, :, 4:].view(2, 3, 2, 5)
    flat = _tiled((a, b))
    assert flat is not None and flat.shape == (6, 14) and flat.data_ptr() == buf.data_ptr()
    one = torch.zeros(3, 14, dtype=torch.float64)  # sums [G, ...] with a labeling axis added: any stride
    assert _tiled((one[:, :4][None], one[:, 4:].view(3, 2, 5)[None])) is not None
    assert _tiled((b, a)) is None  # another order
    assert _tiled((a,)) is None  # columns left over
    assert _tiled((a, torch.zeros(shapes["b"], dtype=torch.float64))) is None  # another buffer
    wide = torch.zeros(2, 3, 15, dtype=torch.float64)
    assert _tiled((wide[:, :, :4], wide[:, :, 4:14].view(2, 3, 2, 5))) is None  # a column of something else
    assert _tiled((buf.float()[:, :, :4], buf.float()[:, :, 4:].view(2, 3, 2, 5))) is None  # not float64


# ------------------------------------------------------------------ the profiler
VOCAB = 12


def test_replicate_blocks_equal_separate_profiles():
    """A run keeping sums per replicate == one run per replicate (its cells alone counted)."""
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2).eval()
    g = torch.Generator().manual_seed(1)
    batches = []
    for B, L in ((6, 7), (5, 9)):
        x = torch.randn(B, L, 16, generator=g)
        mask = torch.rand(B, L, generator=g) < 0.3
        mask[:, 0] = False
        tokens = torch.randint(0, VOCAB, (B, L), generator=g)
        animals = np.array(["f1", "m1", "f2", "m2", "m1"] * 2)[:B]
        batches.append((x, mask, tokens, animals))
    owner = {"f1": "a", "f2": "a", "m1": "b", "m2": "b"}
    options = dict(genes=[f"g{i}" for i in range(VOCAB)], window=4, panel=["g1", "g3"], n_context=1, backend="torch")
    with attnprof.Profiler(encoder, ["a", "b"], replicates=owner, **options) as prof, torch.inference_mode():
        for x, mask, tokens, animals in batches:
            prof.set_batch(groups=[owner[a] for a in animals], tokens=tokens, replicates=animals)
            encoder(x, src_key_padding_mask=mask)
    together = prof.profile
    assert together.blocks.names == ("f1", "f2", "m1", "m2") and together.replicates == {"a": 2, "b": 2}
    for k, animal in enumerate(together.blocks.names):
        with attnprof.Profiler(encoder, ["a", "b"], pseudo_replicates=1, **options) as alone, torch.inference_mode():
            for x, mask, tokens, animals in batches:
                codes = [0 if owner[a] == "a" else 1 for a in animals]
                alone.set_batch(groups=np.where(animals == animal, codes, -1), tokens=tokens)
                encoder(x, src_key_padding_mask=mask)
        g = together.blocks.group[k]
        for name, value in alone.profile.sums.items():
            np.testing.assert_allclose(together.sums[name][:, k], value[:, g], rtol=1e-12, atol=1e-15, err_msg=name)
    table = together.compare("a", "b", min_cells=1).layers  # 2 vs 2 animals: 6 relabelings, exact
    p = table["p_perm_mean_abs_diff"]
    assert p.notna().sum() >= 4 and p.dropna().between(1 / 6, 1).all()  # NaN: a family without elements


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 5),
    H=st.integers(1, 4),
    L=st.integers(1, 150),
    D=st.integers(4, 40),
    N=st.integers(0, 3),
    trailing=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_batched_fused_kernel_equals_reference(B, H, L, D, N, trailing, seed):
    """The compiled whole-batch pass (forced on for every size) equals the reference on every labeling:
    padded rows' output, padding inside the window, panel ids repeated or absent, uncounted cells."""
    from attnprof.kernels import blocked, fused_rows

    if not fused_rows.available():
        pytest.skip("the fused CPU kernel cannot be built here")
    q, k, v, padding, groups, tokens = random_batch(seed, B, H, L, D, 2, trailing=trailing)
    g = torch.Generator().manual_seed(seed)
    labelings = torch.stack([groups, *(torch.randint(-1, 2, (B,), generator=g) for _ in range(N))])
    spec = spec_for(2, L, window=max(1, L // 2), panel=(1, 3, 4, 11))
    plan = build_plan(spec, labelings, padding, tokens)
    results = {}
    for backend in ("torch", "reference"):
        sums = {n: torch.zeros(N + 1, *s.shape, dtype=torch.float64) for n, s in empty_sums(spec, H).items()}
        saved, blocked.FUSED_MIN_SCORES = blocked.FUSED_MIN_SCORES, 0
        try:
            out = planned_stats(q, k, v, plan, [Target(sums)], backend=backend)
        finally:
            blocked.FUSED_MIN_SCORES = saved
        results[backend] = out, sums
    (out, fast), (out_ref, ref) = results["torch"], results["reference"]
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    for i in range(N + 1):
        assert_sums_close({n: t[i] for n, t in fast.items()}, {n: t[i] for n, t in ref.items()}, atol=1e-5, rtol=1e-5)
