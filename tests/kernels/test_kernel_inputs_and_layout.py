"""Tests that kill the mutants mutmut left alive in kernels/plan.py, reduce.py, spec.py and reference.py
(``scripts/mutation.sh kernels``). Each checks behaviour through public functions only.

Mutants left alive on purpose, because they are equivalent (no input can tell them apart):

- ``device=q.device`` / ``device=P.device`` dropped or set to None (spec, reduce, reference): every tensor
  here lives on the CPU, where torch's default device is the same one; the CUDA CI job covers the rest.
- einsum subscripts in upper case ("bhid" -> "BHID"): torch accepts either case with the same meaning.
- ``float("-inf")`` -> ``float("-INF")``: Python parses both to minus infinity.
- reference entropy ``sum(-1)`` -> ``sum(1)``/``sum(-2)``, and ``mean(-1)`` -> ``mean(1)`` or ``stack(dim=1)``
  over 2-D tensors: the per-cell summary is the total over rows and keys divided by the rows, which is the
  same whichever axis is summed first; for 2-D tensors axis 1 is axis -1.
- ``received[...].sum(-1)`` -> ``sum(1)`` and ``mean(-1)`` -> ``mean(1)`` on the 2-D ``[H, n]`` arrays: same axis.
- ``panel_positions``: ``argsort(dim=1)`` -> default dim (-1, the same axis of a 2-D tensor); the -1
  sentinel -> -2 (readers only test ``>= 0``); ``M = 0`` -> 1 for an empty batch (refused before);
  ``stable=False`` (positions of a panel token are summed, so their order does not change any sum); the
  argsort key ``.to(torch.uint8)`` -> ``.to(None)`` (bool sorts False before True, like 0 before 1).
- ``check_inputs`` / ``check_batch``: tokens given to a spec without ``vocab_size`` -> None: without gene
  statistics nothing reads the tokens.
- ``stats_from_probs``: ``sums`` given -> fresh zeros: no caller passes ``sums`` since the batch plan.
- ``StatsSpec``: ``(self.vocab_size or 0)`` -> ``or 1`` in the panel range: a panel without vocab_size is
  refused one check earlier.
- ``device=dev`` / ``device=device`` dropped or None all through ``build_plan`` and ``check_batch`` (and
  ``dev = None``, ``check_batch(..., None)``): as above, CPU is torch's default device.
- dtypes left to torch where it infers the same one: ``torch.full(..., -1)`` and ``torch.tensor(spec.panel)``
  of Python ints are int64 without ``dtype=torch.long``; ``argsort(padding.to(None))`` sorts bools like 0/1;
  ``argsort(dim=1)`` -> default dim of a 2-D tensor.
- ``counted_slot`` and the panel slot map's -1 sentinel -> -2: every reader tests ``>= 0``.
- ``BatchPlan.cache_cu``, ``_onehot_t``'s, ``_gene_chunks``' and ``_features``' cache keys and ``_layer_features``' key in
  ``cells.shared`` renamed or None: a cache that misses (or is keyed differently) recomputes the same
  values; ``_gene_features``' chunk size ``max(1, ...)`` -> ``max(2, ...)`` or ``// max(C * H, 2)``: the
  chunk size changes, never the sums (chunked sums are tested with several chunk sizes); its ``not
  gene_stats or not genes.numel()`` -> ``and``: without gene statistics the plan holds no genes either.
- the tiled reduction: ``tiled_zeros`` reading ``[n, G]`` from another name of the family (all share it);
  ``_add_genes`` ``slice(0, H)`` -> ``slice(None, H)`` / ``slice(H)`` (the same slice) and ``V`` read from
  another gene sum (all share the gene axis); ``_part``'s shortcut for the whole range dropped (the slice
  holds the same values); ``_contiguous_strides``' ``if shape`` -> ``or True`` (a sum without trailing axes
  gets a stride ``zip`` never reaches).
- ``reduce_into``: the assertion text of contiguous labelings (an internal invariant, never a user error);
  ``cells.received is not None and plan.genes.numel()`` -> ``or``: every backend returns ``received``
  exactly when the spec has gene statistics, and with no genes the reduction loops over nothing.
- ``pair_means`` / reference einsum subscripts in upper case; reference ``float("-INF")``: see above.

The 194 mutants mutmut reported as "no tests" sat in functions with no caller since the batch plan
(``reduce.group_onehot``, ``add_group_sums``, ``add_window_counts``, ``add_received``, ``add_pairs``,
``reference.reference_stats``); those functions were deleted after the run.
"""

from __future__ import annotations

import re

import pytest
import torch

from attnprof.kernels import StatsSpec, attention_stats, build_plan, sum_shapes
from attnprof.kernels.blocked import batch_rows
from attnprof.kernels.spec import MAX_WINDOW, check_inputs
from helpers import assert_sums_close, random_batch, spec_for

SPEC = StatsSpec(n_groups=2, window=4, vocab_size=6)


def good(B=2, H=2, L=5, D=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    return dict(
        q=torch.randn(B, H, L, D, generator=g).to(dtype),
        k=torch.randn(B, H, L, D, generator=g).to(dtype),
        v=torch.randn(B, H, L, D, generator=g).to(dtype),
        groups=torch.tensor([0, 1][:B] + [0] * max(B - 2, 0)),
        tokens=torch.zeros(B, L, dtype=torch.long),
        key_padding_mask=None,
        spec=SPEC,
        backend="reference",
    )


def refuses(message: str, **change):
    """The error message starts with ``message`` (anchored: a mutated message text fails too)."""
    args = {**good(), **change}
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        attention_stats(**args)


def test_each_input_check_fires_alone_with_its_full_message():
    x = good()
    shape = "got q (2, 2, 5, 4), k (2, 2, 5, 4), v (2, 2, 6, 4)"
    refuses(f"q, k, v must have the same shape [B, H, L, D] (self-attention); {shape}", v=torch.randn(2, 2, 6, 4))
    refuses("q, k, v must have the same shape [B, H, L, D] (self-attention); got q (2, 2, 5, 4), k (2, 2, 6, 4)",
            k=torch.randn(2, 2, 6, 4))  # fmt: skip
    refuses("q, k, v must share one dtype of float32, float16 or bfloat16; got torch.float32, torch.float32, "
            "torch.float16", v=x["v"].half())  # fmt: skip
    dtypes = "q, k, v must share one dtype of float32, float16 or bfloat16; got "
    refuses(dtypes + "torch.float32, torch.float16, torch.float32", k=x["k"].half())
    refuses(dtypes + "torch.float64, torch.float64, torch.float64", q=x["q"].double(), k=x["k"].double(),
            v=x["v"].double())  # fmt: skip
    for name in ("q", "k", "v"):
        bad = x[name].clone()
        bad[1, 1, 2, 3] = float("nan")
        refuses(f"{name} contains NaN or Inf: the model's activations are not finite before attention "
                f"(check the inputs and the dtype; fp16 overflows above 65504)", **{name: bad})  # fmt: skip
    empty = torch.zeros(0, 2, 5, 4)
    refuses("empty batch: q has shape (0, 2, 5, 4); pass at least one cell and one token", q=empty, k=empty, v=empty,
            groups=torch.zeros(0, dtype=torch.long), tokens=torch.zeros(0, 5, dtype=torch.long))  # fmt: skip
    empty = torch.zeros(2, 2, 0, 4)
    refuses("empty batch: q has shape (2, 2, 0, 4); pass at least one cell and one token", q=empty, k=empty, v=empty, tokens=torch.zeros(2, 0).long())
    refuses("group codes [-2] are out of range: codes must be in [0, 2) or -1 (not counted)",
            groups=torch.tensor([-2, 0]))  # fmt: skip
    refuses("groups must be integer codes in [0, 2) or -1, got dtype torch.bool", groups=torch.tensor([True, False]))
    refuses("key_padding_mask must have shape [B, L] = [2, 5], got (2, 4)", key_padding_mask=torch.zeros(2, 4).bool())
    refuses("tokens must be integer token ids, got dtype torch.float32", tokens=torch.zeros(2, 5))
    refuses("tokens must be integer token ids, got dtype torch.bool", tokens=torch.zeros(2, 5, dtype=torch.bool))
    refuses("token ids [6] are outside the vocabulary [0, 6); raise vocab_size or fix the tokenizer",
            tokens=torch.full((2, 5), 6))  # fmt: skip
    wide = good(L=6)
    many = torch.arange(6, 18).reshape(2, 6)  # 12 ids out of range: the message lists the first 10
    refuses(f"token ids {list(range(6, 16))} are outside the vocabulary [0, 6)", **{**wide, "tokens": many})
    refuses("this spec has vocab_size set, so gene statistics need token ids: pass tokens [B, L]", tokens=None)


def test_empty_cells_are_listed_ten_at_most():
    B = 12
    x = good(B=B)
    padding = torch.ones(B, 5, dtype=torch.bool)
    padding[11, 0] = False
    refuses(f"cells {list(range(10))} have no real token (all keys are padding); drop zero-length cells first",
            **{**x, "key_padding_mask": padding})  # fmt: skip


def test_largest_vocabulary_token_and_tokens_without_gene_statistics_are_accepted():
    x = good()
    x["tokens"] = torch.full((2, 5), 5)  # vocab_size - 1: the last id
    _, sums = attention_stats(**x)
    assert sums["recv_count"][:, 5].tolist() == [1, 1]
    # a spec without vocab_size ignores gene statistics; tokens given anyway are accepted as ids
    no_genes = StatsSpec(n_groups=2, window=4)
    _, sums = attention_stats(**{**x, "spec": no_genes, "tokens": torch.ones(2, 5, dtype=torch.int32)})
    assert "recv_sum" not in sums and sums["cells"].tolist() == [1, 1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_groups=1, window=MAX_WINDOW + 1), f"window must be in [1, {MAX_WINDOW}], got {MAX_WINDOW + 1}"),
        (dict(n_groups=1, window=0), f"window must be in [1, {MAX_WINDOW}], got 0"),
        (dict(n_groups=1, vocab_size=0), "vocab_size must be >= 1, got 0"),
        (dict(n_groups=1, n_context=-1), "n_context must be >= 0, got -1"),
        (dict(n_groups=0), "n_groups must be >= 1, got 0"),
        (dict(n_groups=1, panel=(1,)), "a gene-pair panel needs vocab_size (panel entries are token ids)"),
        (dict(n_groups=1, vocab_size=5, panel=(5,)), "panel token ids [5] are outside the vocabulary [0, 5)"),
        (dict(n_groups=1, vocab_size=5, panel=(-1,)), "panel token ids [-1] are outside the vocabulary [0, 5)"),
        (dict(n_groups=1, vocab_size=5, panel=(2, 2)), "panel token ids must be unique, got [2, 2]"),
    ],
)
def test_spec_limits_and_messages(kwargs, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        StatsSpec(**kwargs)


def test_spec_accepts_its_limits_and_normalizes_the_panel():
    import numpy as np

    assert StatsSpec(n_groups=1, window=MAX_WINDOW).window == MAX_WINDOW
    assert StatsSpec(n_groups=1, window=1).window == 1
    assert StatsSpec(n_groups=1, vocab_size=1, panel=(0,)).panel == (0,)
    spec = StatsSpec(n_groups=1, vocab_size=5, panel=np.array([4, 0]), n_context=0)
    assert spec.panel == (4, 0) and all(type(t) is int for t in spec.panel)
    assert sum_shapes(spec, 3)["pair_sum"] == (1, 3, 2, 2)


def test_uncounted_cells_before_counted_ones_do_not_stop_the_reference():
    q, k, v, padding, _, tokens = random_batch(8, 4, 2, 9, 8, 2)
    spec = spec_for(2, 9)
    groups = torch.tensor([-1, 0, -1, 1])
    _, ref = attention_stats(q, k, v, spec=spec, groups=groups, key_padding_mask=padding, tokens=tokens,
                             backend="reference")  # fmt: skip
    _, fast = attention_stats(q, k, v, spec=spec, groups=groups, key_padding_mask=padding, tokens=tokens,
                              backend="torch")  # fmt: skip
    assert ref["cells"].tolist() == [1, 1]
    assert_sums_close(fast, ref)


def test_reference_output_keeps_the_input_dtype():
    for dtype in (torch.float16, torch.bfloat16):
        out, _ = attention_stats(**good(dtype=dtype))
        assert out.dtype == dtype


def test_probabilities_that_underflow_to_zero_add_no_nan_to_the_entropy():
    """Scores 200 apart: exp underflows, P is exactly 0 for some keys; 0 * log 0 counts as 0."""
    q = torch.zeros(1, 1, 3, 1)
    q[..., 0] = 1.0
    k = torch.tensor([0.0, 200.0, -200.0]).reshape(1, 1, 3, 1)
    v = torch.randn(1, 1, 3, 1)
    spec = StatsSpec(n_groups=1, window=3)
    for backend in ("reference", "torch"):
        _, sums = attention_stats(q, k, v, spec=spec, groups=[0], scale=1.0, backend=backend)
        assert torch.isfinite(sums["summary_sum"]).all(), backend
        assert sums["summary_sum"][0, 0, 0].item() == pytest.approx(0.0, abs=1e-12)  # all mass on one key


# ------------------------------------------------ the batch plan and the plan-era reductions (mutation run of
# kernels/plan.py with reduce, spec and reference; equivalent survivors are listed in the module docstring)
def test_an_explicit_scale_is_used_by_every_backend():
    """A scale other than D**-0.5 (the default) reaches the scores: softmax(scale * q k^T) @ v."""
    x = good(L=5, D=4)
    expected = torch.softmax(x["q"] @ x["k"].transpose(-1, -2) * 0.3, -1) @ x["v"]
    for backend in ("reference", "torch"):
        out, _ = attention_stats(**{**x, "backend": backend}, scale=0.3)
        torch.testing.assert_close(out, expected, msg=backend)
    assert check_inputs(x["q"], x["k"], x["v"], None, x["groups"], x["tokens"], SPEC, 0.3).scale == 0.3


def test_scores_that_overflow_from_finite_q_and_k_are_named():
    """q and k finite but so large that q.k overflows fp32: the scores, not q, k or v, are blamed (by the
    torch backend, from its row log-sum-exp; the reference oracle checks its inputs only)."""
    x = good()
    big = torch.full_like(x["q"], 1e20)
    message = "the attention scores overflowed to NaN or Inf: q and k are finite but too large (fp16?)"
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        attention_stats(**{**x, "q": big, "k": big, "backend": "torch"})


def test_build_plan_messages_and_shape_from_the_tokens():
    spec = StatsSpec(n_groups=2, window=3)
    with pytest.raises(ValueError, match="^" + re.escape(
            "the batch shape is unknown: pass key_padding_mask or tokens [B, L] (or shape=)") + "$"):  # fmt: skip
        build_plan(spec, torch.tensor([0, 1]))
    for shape in ((0, 3), (2, 0)):
        with pytest.raises(ValueError, match="^" + re.escape(
                f"empty batch: shape {shape}; pass at least one cell and one token") + "$"):  # fmt: skip
            build_plan(spec, torch.zeros(shape[0], dtype=torch.long), shape=shape)
    x = good()
    with pytest.raises(ValueError, match="^" + re.escape(
            "groups must have shape [B] = [2], got (3,) (mismatched batch sizes?)") + "$"):  # fmt: skip
        attention_stats(**{**x, "groups": torch.tensor([0, 1, 0])})
    # no mask and no shape: the tokens give the batch shape, and no position is padding
    plan = build_plan(SPEC, torch.tensor([0, 1]), None, torch.zeros(2, 7, dtype=torch.long))
    assert (plan.B, plan.L) == (2, 7) and not plan.padding.any()
    with pytest.raises(ValueError, match="^" + re.escape(
            "groups must have shape [B] = [2], got (1,) (mismatched batch sizes?)") + "$"):  # fmt: skip
        check_inputs(x["q"], x["k"], x["v"], None, torch.tensor([0]), x["tokens"], SPEC, None)
    inp = check_inputs(x["q"], x["k"], x["v"], None, x["groups"], None, StatsSpec(n_groups=2, window=4), None)
    assert inp.padding.shape == (2, 5) and not inp.padding.any() and inp.scale == 4**-0.5


def test_plan_fields_without_a_panel_or_genes():
    """The documented fields of a plan without a panel (M = 0) and without gene statistics (empty int64)."""
    padding = torch.tensor([[False, False, True], [False, True, True], [False, False, False]])
    labelings = torch.tensor([[0, -1, 1], [1, 0, -1]])
    plan = build_plan(StatsSpec(n_groups=2, window=2), labelings, padding)
    C = 3  # every cell is counted in some labeling
    assert plan.panel_pos.shape == (C, 0) and plan.panel_pos.dtype == torch.int64
    rows = batch_rows(plan)  # the torch backend's view of the plan
    assert rows.panel_at.shape == (C, 0) and rows.panel_at.dtype == torch.int64
    assert plan.panel_member.shape == (C, 0, 0) and plan.panel_member.dtype == torch.float64
    assert plan.host["panel_count"] == [0, 0, 0] and rows.panel_slot.eq(-1).all()
    for name in ("genes", "gene_pairs", "gene_src", "pair_cell", "pair_gene"):
        field = getattr(plan, name)
        assert field.numel() == 0 and field.dtype == torch.int64, name
    assert torch.equal(plan.real, ~padding) and torch.equal(plan.groups, labelings)
    assert plan.host["counted_lengths"] == [2, 1, 3] and rows.counted_slot.tolist() == [0, 1, 2]
    partly = build_plan(StatsSpec(n_groups=2, window=2), torch.tensor([[-1, 0, 1]]), padding)
    assert partly.host["counted_lengths"] == [1, 3] and torch.equal(partly.groups, torch.tensor([[0, 1]]))
    assert batch_rows(partly).counted_slot.tolist() == [-1, 0, 1]


@pytest.mark.parametrize("chunk", [2, 4])
def test_gene_sums_in_chunks_of_genes_equal_the_reference(monkeypatch, chunk):
    """The gene reduction densifies per chunk of genes (``GENE_CHUNK`` entries of cells x genes x heads):
    many chunks, an uneven last one, each adding at its own genes, give the reference's sums."""
    from attnprof.kernels import features

    q, k, v, padding, groups, tokens = random_batch(11, 4, 2, 9, 8, 2, vocab=12)
    spec = spec_for(2, 9, vocab=12)
    args = dict(spec=spec, groups=groups, key_padding_mask=padding, tokens=tokens)
    _, ref = attention_stats(q, k, v, backend="reference", **args)
    counted = int((groups >= 0).sum())
    monkeypatch.setattr(features, "GENE_CHUNK", chunk * counted * 2)  # chunks of `chunk` genes (H = 2)
    plan = build_plan(spec, groups[None], padding, tokens)
    assert plan.genes.numel() > chunk and plan.genes.numel() % chunk  # several chunks, a ragged last one
    _, fast = attention_stats(q, k, v, backend="torch", **args)
    assert_sums_close(fast, ref)


# ------------------------------------------------------------------ the tiled reduction (reduce.py)
def _tiled_setup(N=2, H=2, seed=5):
    """A plan with genes, a panel and N permutation labelings, a layer's CellResults (torch backend),
    and sums shaped for a full target (with squares) and a compact permutation target."""
    from attnprof.kernels.blocked import blocked_cells
    from attnprof.kernels.spec import empty_sums

    q, k, v, padding, groups, tokens = random_batch(seed, 5, H, 9, 8, 2)
    g = torch.Generator().manual_seed(seed)
    labelings = torch.stack([groups, *(torch.randint(-1, 2, (5,), generator=g) for _ in range(N))])
    plan = build_plan(spec_for(2, 9, window=4, panel=(1, 3)), labelings, padding, tokens)
    _, cells = blocked_cells(q, k, v, plan, 8**-0.5)
    V = plan.genes.numel()
    shapes = {n: (N + 1, *s.shape) for n, s in empty_sums(plan.spec, H).items()}
    compact = {n: (N, *s[1:-1], V) if n.startswith("recv") else (N, *s[1:]) for n, s in shapes.items() if not n.endswith("_sq")}
    return plan, cells, shapes, compact


def _separate(shapes):
    return {n: torch.zeros(s, dtype=torch.float64) for n, s in shapes.items()}


def _reduced(plan, cells, full, null):
    from attnprof.kernels import Target
    from attnprof.kernels.reduce import CellResults, reduce_into

    V = plan.genes.numel()
    for target in (Target(full), Target(null, slice(1, None), torch.arange(V - 1, -1, -1))):
        reduce_into(plan, CellResults(cells.summary, cells.window, cells.received, cells.pair), target)
    return full, null


def _aten_ops(fn) -> list[str]:
    from torch.utils._python_dispatch import TorchDispatchMode

    ops = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(str(func.overloadpacket.__name__))
            return func(*args, **(kwargs or {}))

    with Log():
        fn()
    return ops


def test_tiled_sums_take_one_matmul_per_target_and_separate_sums_one_per_sum(monkeypatch):
    """Which path each layout takes (the results are equal either way: tests/test_plan.py): sums from
    tiled_zeros take one matmul and one index_add_ (the rows holding a cell) per target for every dense sum and
    count, and per gene chunk one matmul and one scatter-add (index_put_ on a GPU, as here) for the gene sums;
    separate sums one index_add_ per dense sum and one scatter-add per gene sum. No op count depends on the batch."""
    from attnprof.kernels import tiled_zeros
    from attnprof.kernels.features import DENSE, GENES, _features

    monkeypatch.setenv("ATTNPROF_FUSED", "0")  # the GPU's path: the CPU's scatter is the C++ extension's, no aten op
    plan, cells, shapes, compact = _tiled_setup()
    chunks = len(_features(plan, 2).genes)  # the plan's buffers exist before the count (made once per plan)
    tiled = _aten_ops(lambda: _reduced(plan, cells, tiled_zeros(shapes), tiled_zeros(compact)))
    assert tiled.count("addmm_") == 0 and tiled.count("mm") == 2 * (1 + chunks)
    assert _after(tiled, "mm", "index_add_") == 2 and _after(tiled, "mm", "index_put_") == 2 * chunks
    separate = _aten_ops(lambda: _reduced(plan, cells, _separate(shapes), _separate(compact)))
    dense = [n for n in DENSE if n in shapes] + [n for n in DENSE if n in compact]
    genes = [n for n in GENES if n in shapes] + [n for n in GENES if n in compact]
    assert separate.count("index_add_") == len(dense)
    assert separate.count("index_put_") - tiled.count("index_put_") == chunks * (len(genes) - 2)  # sums, not blocks


def _after(ops: list[str], first: str, then: str) -> int:
    """How often op ``then`` follows op ``first`` with only views and index building between them (a product
    added into the sums)."""
    between = {"view", "slice", "as_strided", "select", "unsqueeze", "expand", "alias", "permute", "arange"}
    ops = [o for o in ops if o not in between]
    return sum(a == first and b == then for a, b in zip(ops, ops[1:]))


def test_sums_that_are_not_contiguous_or_not_a_prefix_are_added_exactly():
    """The per-sum fallback: non-contiguous sums (a permuted view) and tiled sums whose names are not a
    prefix of the features' columns (no pos_* sums, no recv_count) get the same values as separate sums."""
    from attnprof.kernels import tiled_zeros

    plan, cells, shapes, compact = _tiled_setup()
    expected = _reduced(plan, cells, _separate(shapes), _separate(compact))

    def permuted(shapes):  # each sum a view whose last two axes are swapped twice: same shape, other strides
        return {n: torch.zeros(*s[:-2], s[-1], s[-2], dtype=torch.float64).transpose(-1, -2) if len(s) > 3
                else torch.zeros(s[::-1], dtype=torch.float64).permute(*range(len(s) - 1, -1, -1))
                for n, s in shapes.items()}  # fmt: skip

    got = _reduced(plan, cells, permuted(shapes), permuted(compact))
    assert any(not t.is_contiguous() for t in got[0].values())
    without_pos = [{n: s for n, s in sh.items() if not n.startswith("pos") and n != "recv_count"} for sh in (shapes, compact)]
    partial = _reduced(plan, cells, *(tiled_zeros(sh) for sh in without_pos))
    for want, have, part in zip(expected, got, partial):
        for n in want:
            torch.testing.assert_close(have[n], want[n], atol=0, rtol=0, msg=n)
            if n in part:
                torch.testing.assert_close(part[n], want[n], atol=0, rtol=0, msg=n)


def test_a_target_finds_its_tiling_once_when_made():
    """The tiling is found when the Target is made (no cache to go stale): tiled_zeros' dense sums are one
    [n G, F] matrix over their memory, the gene sums one [n G, 2H + 1, V] block; sums in separate tensors, or
    strided otherwise, tile nothing."""
    from attnprof.kernels import Target, tiled_zeros

    shapes = {"summary_sum": (1, 2, 3, 4), "pos_sum": (1, 2, 3, 2, 2), "recv_sum": (1, 2, 3, 5),
              "recv_count": (1, 2, 5), "recv_sq": (1, 2, 3, 5)}  # fmt: skip
    target = Target(tiled_zeros(shapes))
    assert target.dense_names == ("summary_sum", "pos_sum") and target.dense.shape == (2, 12 + 12)
    assert target.dense.data_ptr() == target.sums["summary_sum"].data_ptr()
    assert target.gene_names == ("recv_sum", "recv_count", "recv_sq") and target.gene_block.shape == (2, 7, 5)
    target.dense[1, 12] = 1.0  # group 1's first pos_sum entry
    assert target.sums["pos_sum"][0, 1, 0, 0, 0] == 1.0
    separate = Target({name: torch.zeros(shape, dtype=torch.float64) for name, shape in shapes.items()})
    assert separate.dense is None and separate.gene_block is None
    no_counts = Target({k: v for k, v in tiled_zeros(shapes).items() if k != "recv_count"})
    assert no_counts.gene_block is None  # sums and squares without the counts between them: no prefix of GENES
    assert Target({"summary_sum": torch.zeros(4, 3, 2, 1, dtype=torch.float64).transpose(0, 2)}).dense is None


def test_the_tiled_layout_check_tests_each_property_alone():
    """_tiled refuses a layout that differs in one property only (dtype, leading shape, the stride of a
    size-2 axis) and accepts any stride on a size-1 axis; its matrix starts where the first sum starts."""
    from attnprof.kernels.reduce import _tiled

    def pair(buf):
        return buf[:, :, :4], buf[:, :, 4:].view(2, 3, 2, 5)

    assert _tiled(pair(torch.zeros(2, 3, 14, dtype=torch.float32))) is None  # float32, else tiled
    buf = torch.zeros(2, 3, 14, dtype=torch.float64)
    assert _tiled((buf[:, :, :4], buf[:1, :, 4:].view(1, 3, 2, 5))) is None  # 1 labeling, not 2
    odd = buf.as_strided((2, 3, 2, 5), (42, 14, 4, 1), 4)  # the size-2 axis steps 4, not 5
    assert _tiled((buf[:, :, :4], odd)) is None
    one = torch.zeros(3, 14, dtype=torch.float64)
    loose = one.as_strided((1, 3, 4), (999, 14, 1), 0)  # a size-1 axis with any stride
    assert _tiled((loose, one[:, 4:].view(1, 3, 2, 5))) is not None
    storage = torch.zeros(100 + 2 * 3 * 14, dtype=torch.float64)
    inner = storage[100:].view(2, 3, 14)  # a buffer that starts inside its storage
    flat = _tiled(pair(inner))
    assert flat.data_ptr() == inner.data_ptr() and flat.shape == (6, 14)
    flat[0, 4] = 7.0
    assert inner[0, 0, 4] == 7.0


def test_tiled_zeros_keeps_the_names_order_and_one_buffer_per_family():
    from attnprof.kernels import tiled_zeros

    shapes = {"recv_count": (2, 3, 5), "pos_sum": (2, 3, 1, 2, 2), "cells": (2, 3), "recv_sum": (2, 3, 1, 5)}
    sums = tiled_zeros(shapes)
    assert list(sums) == list(shapes) and all(sums[n].shape == s for n, s in shapes.items())
    assert sums["pos_sum"].untyped_storage().data_ptr() == sums["cells"].untyped_storage().data_ptr()
    assert sums["recv_sum"].untyped_storage().data_ptr() == sums["recv_count"].untyped_storage().data_ptr()
    assert sums["pos_sum"].untyped_storage().data_ptr() != sums["recv_sum"].untyped_storage().data_ptr()
    assert all(t.dtype == torch.float64 and not t.any() for t in sums.values())
