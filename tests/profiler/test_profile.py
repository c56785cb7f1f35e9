"""Profile storage and merging; validate() on a small model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import attnprof

VOCAB = 25


def model():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    return nn.TransformerEncoder(layer, 2).eval()


def data(B=8, L=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, 16, generator=g)
    tokens = torch.randint(0, VOCAB, (B, L), generator=g)
    padding = torch.arange(L)[None, :] >= torch.randint(1, L + 1, (B, 1), generator=g)
    labels = np.array(["a", "b"] * (B // 2))
    return x, tokens, padding, labels


def profile_of(m, x, tokens, padding, labels, **options):
    options = {"genes": VOCAB, "window": 5, "panel": [2, 3], **options}
    with attnprof.Profiler(m, groups=["a", "b"], **options) as prof, torch.inference_mode():
        prof.set_batch(groups=labels, tokens=tokens)
        m(x, src_key_padding_mask=padding)
    return prof.profile


@pytest.fixture
def shards():
    m = model()
    x, tokens, padding, labels = data()
    whole = profile_of(m, x, tokens, padding, labels)
    parts = [profile_of(m, x[s], tokens[s], padding[s], labels[s]) for s in (slice(0, 3), slice(3, 8))]
    return whole, parts


def test_merged_shards_equal_one_run(shards):
    whole, parts = shards
    merged = attnprof.merge(parts)
    assert merged.layout() == whole.layout()
    merged, whole = merged.group_sums(), whole.group_sums()  # each run deals its own pseudo-replicates
    for name in whole:
        np.testing.assert_allclose(merged[name], whole[name], rtol=1e-9, atol=1e-12, err_msg=name)


def test_save_and_load_roundtrip(shards, tmp_path):
    whole, _ = shards
    path = whole.save(tmp_path / "p.npz")
    loaded = attnprof.Profile.load(path)
    assert loaded.layout() == whole.layout()
    assert loaded.meta == whole.meta
    for name in whole.sums:
        np.testing.assert_array_equal(loaded.sums[name], whole.sums[name])
    assert loaded.compare("a", "b").heads.equals(whole.compare("a", "b").heads)
    assert not list(tmp_path.glob("*.tmp"))


def test_merge_refuses_another_layout(shards):
    whole, _ = shards
    m = model()
    x, tokens, padding, labels = data()
    other = profile_of(m, x, tokens, padding, labels, window=4)
    with pytest.raises(ValueError, match="different layout.*window: 5 vs 4"):
        whole + other
    with pytest.raises(ValueError, match="at least one"):
        attnprof.merge([])


def test_corrupted_file_is_named(shards, tmp_path):
    whole, _ = shards
    path = whole.save(tmp_path / "p.npz")
    data_ = path.read_bytes()
    broken = tmp_path / "broken.npz"
    broken.write_bytes(data_[: len(data_) // 2])
    with pytest.raises(ValueError, match="broken.npz is not a readable attnprof profile"):
        attnprof.Profile.load(broken)


def test_validate_reports_small_errors():
    m = model()
    x, tokens, padding, labels = data()
    table = attnprof.validate(m, {"src": x, "src_key_padding_mask": padding}, groups=labels, tokens=tokens,
                              genes=VOCAB, window=5, panel=[2, 3], backend="torch")  # fmt: skip
    assert table["ok"].all(), table
    assert set(table["quantity"]) >= {"output", "pos_sum", "recv_sum", "pair_sum", "summary_sum"}
    assert table.loc[table["quantity"] == "output", "max_abs_err"].item() <= 1e-5


def test_validate_catches_a_wrong_backend(monkeypatch):
    """A backend that is off by a little is reported, not hidden."""
    from attnprof.kernels.backends import TorchBackend

    real = TorchBackend.cells

    def off_by_a_bit(self, q, k, v, plan, scale):
        out, cells = real(self, q, k, v, plan, scale)
        cells.window.mul_(1.001)
        return out, cells

    monkeypatch.setattr(TorchBackend, "cells", off_by_a_bit)
    m = model()
    x, tokens, padding, labels = data()
    table = attnprof.validate(m, (x, None, padding), groups=labels, tokens=tokens, genes=VOCAB, backend="torch")
    bad = table[table["against"].isin(["reference", "plain model output"])].set_index("quantity")["ok"]
    assert not bad["pos_sum"] and bad["output"] and bad["recv_sum"]
