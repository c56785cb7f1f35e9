"""The triton backend's launchers: kernel 1, then kernel 2's passes, per layer on a batch plan.

Kernel 1 (:mod:`.triton_forward`) writes the output, each row's ``term = bias - lse2`` and the row
statistics. Kernel 2 rebuilds the exact P from ``term`` and reduces it: the column and entry passes
(:mod:`.triton_columns`: gene received, window, panel pairs) and the whole-context maps' pass
(:mod:`.triton_maps`). Each program owns everything it writes: no atomics, a fixed summation order.

Per-cell results are then reduced into group sums by the small torch functions of
:mod:`.reduce` (one-hot matmuls, fixed-size scatters), shared with the torch backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton

from .maps import cell_maps
from .reduce import CellResults
from .triton_columns import (  # noqa: F401 (the kernels and tables, also read through this module by tests and benches)
    COLUMNS_CONFIGS,
    ENTRIES_CONFIGS,
    _columns_kernel,
    _entries_kernel,
    exp2_fma,
)
from .triton_common import LOG2E, launch
from .triton_forward import block_d, check_grid, check_tensors, dot_precision, extents, forward, key_bias
from .triton_maps import binned_rows
from .triton_options import resolve


# ----------------------------------------------------------------------------- launchers
@dataclass
class KernelResults:
    """Per counted cell (in the order of ``cells``), what the kernels compute for a layer's sums."""

    summary: torch.Tensor  # [C, H, 4] float32: means over real rows, in the order of SUMMARIES
    received: torch.Tensor | None  # [C L, H] float32: mean over real rows of P (0 at padded keys), row c L + key
    window: torch.Tensor  # [C, H, W, W] float32: P among positions < W (0 where either is padding)
    pair: torch.Tensor | None  # [C H, M, M] float32: P among each cell's panel positions
    checksum: torch.Tensor  # 0-dim: sum of every cell's summaries, NaN or Inf if any q, k, v entry was


def cell_results(
    q, k, v, scale: float, *, bias, extent, inv_n, cells, window: int, n_context: int = 0,
    panel_pos=None, received: bool = True, work: dict | None = None, tiles: dict | None = None,
    precision: str | None = None, deterministic: bool | None = None,
):  # fmt: skip
    """Kernel 1, then kernel 2 on the counted cells: ``(out, KernelResults)``.

    Everything data-dependent comes in as device tensors (built once per forward), so nothing here
    waits for the device: ``bias`` [B, L] float32 (0 real, MASKED padding), ``extent`` [B] int32 (one
    past the last real token), ``inv_n`` [B] float32 (1 / real tokens), ``cells`` [C] int64 (counted
    cells' batch indices), ``panel_pos`` [C, M] int64 (-1 = none) or None; ``window`` is min(W, L).
    ``work``: buffers to reuse across the layers of a forward (filled on first use; results live in
    them until the next call). ``tiles``: {"forward": buf, "columns": buf} zeroed int32 buffers (one
    entry per program, at least ``B * H * L`` and ``C * H * L``) to count the tiles each program visits.
    ``precision``, ``deterministic``: see :mod:`.triton_options` (None: the options in force).
    """
    check_tensors(q, k, v)
    opts = resolve(precision, deterministic)
    B, H, L, D = q.shape
    C = cells.shape[0]
    check_grid(C * H * max(L, window * window), "counted cells x heads x max(L, W^2)")
    tiles = {} if tiles is None else tiles
    work = {} if work is None else work
    out, term, rowstats = forward(
        q, k, v, bias, extent, scale, inv_n=inv_n, n_context=n_context, tiles=tiles.get("forward"),
        term=work.get("term"), rowstats=work.get("rowstats"), precision=opts.precision,
        deterministic=opts.deterministic,
    )  # fmt: skip
    work.update(term=term, rowstats=rowstats)
    every = rowstats.sum(-1)  # [B, H, 4]: rows come weighted by real / n (NaN if any q, k, v was not finite)
    summary = every.index_select(0, cells)
    common = (*q.stride(), *k.stride())
    meta = dict(HEAD_D=D, BLOCK_D=block_d(D), DOT_PREC=dot_precision(q.dtype, opts.precision))
    qk_scale = scale * LOG2E
    recv = None
    if received:
        recv = _buffer(work, "received", (C * L, H), q.device)  # [C L, H]: the rows the reduction gathers per token
        grid = lambda meta: (C * H * triton.cdiv(L, meta["BLOCK_N"]),)  # noqa: E731
        cols = tiles.get("columns")
        args = (q, k, bias, term, extent, inv_n, cells, recv, cols if cols is not None else extent,
                *common, H, L, triton.next_power_of_2(L), qk_scale)  # fmt: skip
        launch(_columns_kernel, grid, args, dict(meta, COUNT_TILES=cols is not None), opts.deterministic)
    meta["deterministic"] = opts.deterministic
    win = _entries(work, "window", q, k, bias, term, extent, cells, None, window, common, L, qk_scale, meta)
    pair = None
    if panel_pos is not None and panel_pos.shape[1]:
        M = panel_pos.shape[1]
        pair = _entries(work, "pair", q, k, bias, term, extent, cells, panel_pos, M, common, L, qk_scale, meta,
                        shape=(C * H, M, M))  # as the pair means' batched matmul takes it  # fmt: skip
    return out, KernelResults(summary, recv, win, pair, every.sum())


def _buffer(work: dict, name: str, shape, device, dtype=torch.float32) -> torch.Tensor:
    if name not in work or tuple(work[name].shape) != tuple(shape) or work[name].dtype != dtype:
        work[name] = torch.empty(shape, dtype=dtype, device=device)
    return work[name]


def _entries(work, name, q, k, bias, term, extent, cells, pos, W, common, L, qk_scale, meta, shape=None):
    """The kernel writes ``[C, H, W, W]`` contiguous; ``shape`` allocates that memory viewed otherwise."""
    C, H = cells.shape[0], q.shape[1]
    block = _buffer(work, name, shape or (C, H, W, W), q.device)
    grid = lambda m: (C * H * triton.cdiv(W, m["BLOCK_M"]) * triton.cdiv(W, m["BLOCK_N"]),)  # noqa: E731
    meta = dict(meta)
    deterministic = meta.pop("deterministic")
    args = (q, k, bias, term, extent, cells, pos if pos is not None else cells, block, *common, H, L, W, qk_scale)
    launch(_entries_kernel, grid, args, dict(meta, WINDOW=pos is None), deterministic)
    return block


# ----------------------------------------------------------------------------- on a batch plan
@dataclass(eq=False)
class PlanDevice:
    """What the kernels take from a batch plan, derived once per plan (per forward), on its device."""

    bias: torch.Tensor  # [B, L] float32: 0 real, MASKED padding
    extent: torch.Tensor  # [B] int32: one past the last real token
    inv_n: torch.Tensor  # [B] float32: 1 / real tokens
    finite: list  # one 0-dim checksum per layer call, in call order: finite iff its q, k, v were
    work: dict = field(default_factory=dict)  # the kernels' buffers, reused by every layer
    panel: tuple | None = None  # the pair means' factors per (cell, head): rows_mean [C H, K, M], member^T [C H, M, K]


def plan_device(plan) -> PlanDevice:
    """The plan's kernel inputs, built at its first layer call (a few ops, no host sync) and kept in
    its cache."""
    return plan.derived("triton", lambda: PlanDevice(key_bias(plan.padding), extents(plan.padding),
                                                     plan.lengths.to(torch.float32).reciprocal(), []))


def triton_cells(q, k, v, plan, scale: float, *, precision: str | None = None, deterministic: bool | None = None):
    """The triton backend on a plan: ``(out, CellResults)`` for :func:`attnprof.kernels.reduce.reduce_into`.

    No host sync: everything data-dependent comes from the plan. Non-finite q, k or v (a NaN row
    log-sum-exp, or a NaN output) is not raised here, which would wait for the device: each call
    appends a device checksum to ``plan_device(plan).finite`` and :func:`first_non_finite` checks them
    all with one sync (the caller does, once per forward).
    ``precision``, ``deterministic``: see :mod:`.triton_options` (None: the options in force).
    """
    spec, dev = plan.spec, plan_device(plan)
    opts = resolve(precision, deterministic)
    out, res = cell_results(
        q, k, v, scale, bias=dev.bias, extent=dev.extent, inv_n=dev.inv_n, cells=plan.counted,
        window=plan.window, n_context=spec.n_context, panel_pos=plan.panel_pos if spec.panel else None,
        received=spec.gene_stats, work=dev.work, precision=opts.precision, deterministic=opts.deterministic,
    )  # fmt: skip
    dev.finite.append(res.checksum)  # kernel 1 folds every row's lse and output into it
    cells = CellResults(summary=res.summary, window=res.window)
    if spec.gene_stats:  # per (cell, gene) pair: its tokens' column means, summed
        recv = res.received
        if opts.deterministic:  # a fixed-order gather-sum: index_add_ with repeated ids uses float atomics on CUDA
            at, real = occurrences(plan)
            cells.received = (recv[at] * real).sum(1)
        else:  # the reduction adds each token into its (cell, gene) feature itself
            cells.received_tokens = recv
    if spec.panel:
        cells.pair = _pair_means(plan, dev, res.pair, q.shape[1])
    if plan.maps is not None:  # from kernel 1's row terms, which cell_results left in the work buffers
        rows = binned_rows(q, k, dev.work["term"], plan.maps.pos_bin, dev.extent, plan.counted, scale,
                           map_bins=spec.map_bins, map_length=spec.map_length, work=dev.work,
                           precision=opts.precision)  # fmt: skip
        cells.map = cell_maps(plan, rows)
    return out, cells


def occurrences(plan) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (cell, gene) pair of the plan, where its tokens are: ``at [U, R]`` int64 indices into a
    counted-cell ``[C L]`` array (R = the most occurrences of an id in one cell; unused slots point at
    the pair's first token) and ``real [U, R, 1]`` (1.0 / 0.0), so that ``(x[at] * real).sum(1)`` sums
    each pair's tokens in token order, with no atomics. Once per plan; the one host sync (R) is taken
    with the plan's other per-forward work, not per layer call."""
    def make():
        pairs, U = plan.gene_pairs, plan.pair_cell.numel()
        order = torch.argsort(pairs, stable=True)  # tokens grouped by pair, each group in token order
        counts = torch.zeros(U, dtype=torch.long, device=pairs.device).index_add_(0, pairs, torch.ones_like(pairs))
        starts = counts.cumsum(0) - counts
        R = int(counts.max()) if U else 1
        slot = torch.arange(R, device=pairs.device)
        real = slot < counts[:, None]
        at = plan.gene_src[order][torch.where(real, starts[:, None] + slot, starts[:, None])]
        return at, real[:, :, None].float()

    return plan.derived("occurrences", make)


def _pair_means(plan, dev: PlanDevice, block, H):
    """``[C, H, K, K]``: per cell, the mean over the query occurrences of u of the mass on all
    occurrences of v (0 unless both are present), as two batched matmuls with factors of the plan."""
    K = len(plan.spec.panel)
    if block is None:  # no counted cell holds a panel id
        return torch.zeros(plan.n_counted, H, K, K, dtype=torch.float64, device=plan.device)
    C = plan.n_counted
    if dev.panel is None or dev.panel[0].shape[0] != C * H:  # once per plan: [C H, K, M] and [C H, M, K]
        member = plan.panel_member  # [C, K, M] float64
        rows_mean = member / member.sum(-1, keepdim=True).clamp(min=1)
        dev.panel = tuple(x[:, None].expand(-1, H, -1, -1).reshape(C * H, *x.shape[1:])
                          for x in (rows_mean, member.transpose(1, 2)))  # fmt: skip
    rows_mean, member_t = dev.panel
    if "pair_means" not in dev.work or dev.work["pair_means"][0].shape[0] != C * H:  # reused by every layer: the matmul's [C H, K, K] out, and the same as [C, H, K, K]
        out = torch.empty(C * H, K, K, dtype=torch.float64, device=block.device)
        dev.work["pair_means"] = (out, out.view(C, H, K, K))
    out, means = dev.work["pair_means"]
    torch.bmm(torch.bmm(rows_mean, block.double()), member_t, out=out)
    return means


def first_non_finite(plan) -> int | None:
    """Index (in call order) of the first layer call on ``plan`` whose q, k or v held NaN or Inf, or None.
    One host sync for all calls so far; a profiling run takes it once per forward (e.g. when the
    forward ends), and names the layer from its own call order."""
    dev = plan.cache.get("triton")
    if dev is None or not dev.finite:
        return None
    bad = ~torch.stack(dev.finite).isfinite()
    dev.finite.clear()
    return int(bad.int().argmax()) if bool(bad.any()) else None
