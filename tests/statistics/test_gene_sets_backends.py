"""Gene-set statistics (the family ``set:NAME``) from every backend's sums equal those from the reference backend,
on hypothesis-generated batches (padding anywhere, uncounted cells, repeated tokens); triton under the interpreter
on small shapes."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from attnprof.blocks import Blocks
from attnprof.kernels import attention_stats
from attnprof.profile import Profile

from helpers import random_batch, spec_for

TRITON = importlib.util.find_spec("triton") is not None and (
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
)
BACKENDS = ["torch"] + (["triton"] if TRITON else [])
PER_GROUP = 3  # pseudo-replicate blocks per group: the batch's codes are blocks of two groups
COLUMNS = ["mean_abs_diff", "max_abs_diff", "mean_sq_diff", "noise_floor", "max_abs_t", "n_elements"]


def profile_of(sums: dict, H: int, V: int, window: int, panel) -> Profile:
    """A one-layer profile of one batch's block sums (genes g0.. g{V-1}; ids 0 and 1 special)."""
    blocks = Blocks.pseudo_replicates(2, PER_GROUP)
    arrays = {k: v.double().numpy()[None] for k, v in sums.items()}
    return Profile(arrays, layers=["layer"], groups=["a", "b"], n_heads=H, window=window,
                   genes=[f"g{i}" for i in range(V)], panel=list(panel), blocks=blocks,
                   meta={"special_tokens": [0, 1]})  # fmt: skip


@st.composite
def batches(draw):
    B, H = draw(st.integers(4, 9)), draw(st.integers(1, 3))
    L, D = draw(st.integers(3, 12)), draw(st.sampled_from([16, 32]))
    seed = draw(st.integers(0, 2**31 - 1))
    members = draw(st.lists(st.integers(2, 11), min_size=1, max_size=6, unique=True))
    return B, H, L, D, seed, [f"g{i}" for i in members]


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=12, deadline=None)
@given(batches())
def test_gene_set_rows_equal_the_references(backend, batch):
    B, H, L, D, seed, members = batch
    q, k, v, padding, _, tokens = random_batch(seed, B, H, L, D, 2 * PER_GROUP, vocab=12)
    groups = torch.arange(B) % (2 * PER_GROUP)  # blocks 0-2 are group a, 3-5 group b: both hold cells
    groups[-1] = -1 if B > 6 else groups[-1]  # and a cell counted in no block
    spec = spec_for(2 * PER_GROUP, L, vocab=12, window=min(4, L))
    tables = {}
    for name in ("reference", backend):
        _, sums = attention_stats(q, k, v, key_padding_mask=padding, groups=groups, tokens=tokens, spec=spec,
                                  backend=name)  # fmt: skip
        profile = profile_of(sums, H, 12, spec.window, spec.panel)
        comparison = profile.compare("a", "b", min_cells=1, permutations=20, seed=3, gene_sets={"s": members})
        tables[name] = comparison.heads[comparison.heads["family"] == "set:s"].reset_index(drop=True)
    ref, fast = tables["reference"], tables[backend]
    assert len(ref) == H
    for column in COLUMNS:
        np.testing.assert_allclose(fast[column].to_numpy(float), ref[column].to_numpy(float), rtol=2e-4, atol=1e-6,
                                   equal_nan=True, err_msg=column)  # fmt: skip
