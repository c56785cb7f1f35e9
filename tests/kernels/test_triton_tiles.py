"""The triton backend equals the reference with every tile shape the interpreter can afford.

Under TRITON_INTERPRET=1 each kernel autotunes over one 32x32 config, so tests/test_triton.py never
runs a non-square tile, a tile other than 32, or the column pass without (or with another share of)
exponentials on the FMA pipe. Here a fixture replaces each autotuner's config list by one forced
config (restored afterwards; a single config is launched as is, never benchmarked) and the whole
backend runs end to end against `reference`, with the tolerances of tests/test_triton.py.

The batch is built so that every config meets every edge: cells whose extents (one past the last
real token) leave a partial last tile of 16, 32 and 64 rows or keys, a cell of one token, a cell
whose first 34 keys are padding (its rows see whole key tiles of only masked keys first), padding
scattered inside a cell, a cell not counted, and for the column pass extents that end inside the
exponential-unit rows of a step, inside its FMA rows, or exactly at a step's end.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="the triton backend is an extra: pip install \"attnprof[gpu]\"")

from attnprof.kernels import triton_forward as kf
from attnprof.kernels import triton_stats as ks

from helpers import assert_sums_close, spec_for
from test_triton import DEVICE, FP16, FP32, batch, both, out_tol
from test_triton import pytestmark  # noqa: F401 (skipped without CUDA or the interpreter, as there)

# One forced config per kernel: kernel 1 and the entries kernel (BLOCK_M, BLOCK_N); the column pass
# (BLOCK_M, BLOCK_N, BLOCK_M_FMA), BLOCK_M_FMA query rows per step with exponentials on the FMA pipe.
TILES = [
    dict(forward=(16, 32), columns=(16, 32, 16), entries=(16, 32)),
    dict(forward=(32, 16), columns=(32, 16, 0), entries=(32, 16)),
    dict(forward=(16, 16), columns=(16, 16, 32), entries=(16, 16)),
    dict(forward=(64, 16), columns=(16, 64, 0), entries=(64, 16)),
]
KERNELS = {"forward": kf._forward_kernel, "columns": ks._columns_kernel, "entries": ks._entries_kernel}
SIZES = ("BLOCK_M", "BLOCK_N", "BLOCK_M_FMA")  # the first 2 or 3, in the order of TILES


def tiles_id(tiles: dict) -> str:
    return "-".join(f"{name}{'x'.join(map(str, tiles[name]))}" for name in KERNELS)


@pytest.fixture(params=TILES, ids=tiles_id)
def forced(request, monkeypatch):
    """Each kernel launched with its config of ``request.param`` only: ``{kernel name: Config}``.
    ``best_config`` is cleared, so a test can check that its launches ran the forced config."""
    configs = {}
    for name, kernel in KERNELS.items():
        configs[name] = triton.Config(dict(zip(SIZES, request.param[name])), num_warps=1, num_stages=1)
        monkeypatch.setattr(kernel, "configs", [configs[name]])
        monkeypatch.setattr(kernel, "cache", {})  # a tuning result for the old configs is never reused
        monkeypatch.setattr(kernel, "best_config", None, raising=False)
    return configs


def ragged_batch(dtype):
    """6 cells, H 2, L 50, D 24 (BLOCK_D 32 with head-dim padding). Extents 50, 1, 20, 33, 48, 50:
    50 = 3 * 16 + 2 = 32 + 18 ends inside a last tile of 16 and of 32, and 50 < 64; 33 is one past 32;
    cell 4's real tokens are 34..47 only; cell 3 has holes; cell 5 (a full cell) is not counted.
    Column steps (BLOCK_M + BLOCK_M_FMA rows): 32 = 16 + 16 (20 and 50 end in FMA rows, 33 and 48 in
    exponential-unit rows), 48 = 16 + 32 (20 and 33 end in FMA rows, 50 in exponential-unit rows, 48
    at a step's end), 16 and 32 without FMA rows."""
    B, H, L, D = 6, 2, 50, 24
    q, k, v, _, _, tokens = batch(50, B, H, L, D, dtype)
    lengths = torch.tensor([50, 1, 20, 33, 48, 50])
    padding = torch.arange(L) >= lengths[:, None]
    padding[4, :34] = True
    padding[3, [0, 5, 16, 17, 31]] = True
    groups = torch.tensor([0, 1, 1, 0, 1, -1])
    return q, k, v, padding.to(DEVICE), groups.to(DEVICE), tokens


@pytest.mark.parametrize("dtype", [FP32, FP16], ids=["fp32", "fp16"])
def test_forced_tiles_equal_reference(forced, dtype):
    q, k, v, padding, groups, tokens = ragged_batch(dtype)
    spec = spec_for(2, 50, window=20, n_context=3)  # window 20: a partial last tile of 16 and 32 as well
    (out, sums), (out_ref, ref) = both(q, k, v, padding, groups, tokens, spec)
    assert {name: KERNELS[name].best_config for name in KERNELS} == forced  # these launches ran the forced tiles
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), out_ref.float(), **out_tol(v))
    assert_sums_close(sums, ref, atol=1e-5, rtol=1e-5)


def test_forced_tiles_visit_the_tiles_of_their_shape(forced):
    """The kernels' tile counters (as in test_tiles_visited_scale_with_real_tokens) on the ragged batch:
    kernel 1 visits, for each of its query tiles, the key tiles up to the cell's extent; the column pass,
    for each key tile inside a counted cell's extent, the steps of BLOCK_M + BLOCK_M_FMA query rows up to it."""
    q, k, v, padding, groups, _ = ragged_batch(FP32)
    B, H, L, _ = q.shape
    tiles = {name: torch.zeros(B * H * L, dtype=torch.int32, device=DEVICE) for name in ("forward", "columns")}
    extent = kf.extents(padding)
    cells = torch.nonzero(groups >= 0).flatten()
    inv_n = (~padding).sum(1).float().reciprocal()
    bias = kf.key_bias(padding)
    ks.cell_results(q, k, v, 0.25, bias=bias, extent=extent, inv_n=inv_n, cells=cells, window=8, tiles=tiles)
    assert kf._forward_kernel.best_config is forced["forward"] and ks._columns_kernel.best_config is forced["columns"]
    fwd, col = forced["forward"].kwargs, forced["columns"].kwargs
    counted = extent[cells].long()
    assert {name: int(t.sum()) for name, t in tiles.items()} == {
        "forward": H * cdiv(L, fwd["BLOCK_M"]) * int(cdiv(extent.long(), fwd["BLOCK_N"]).sum()),
        "columns": H * int((cdiv(counted, col["BLOCK_N"]) * cdiv(counted, col["BLOCK_M"] + col["BLOCK_M_FMA"])).sum()),
    }


def cdiv(a, b):
    return -(-a // b)
