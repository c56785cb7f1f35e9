"""The batch plan: everything about a batch that does not depend on q, k, v, built once per forward.

A model calls attention once per layer on the same cells, so the cells' padding, group codes and
token ids are the same for every layer. :func:`build_plan` checks them and derives, once, what every
backend needs; :func:`attnprof.kernels.planned_stats` then does only q, k, v work per layer. A plan
holds every *labeling* of the cells at once (one assignment of cells to groups each; the profiler
uses one, whose groups are its replicate blocks): per-cell results are computed once per layer and
reduced into all labelings together, so another labeling costs reductions, not attention passes.

Notation: B cells of L positions; H heads; G groups; N + 1 labelings (labeling 0 is the observed
one); C counted cells (counted in at least one labeling); T real tokens of all cells; K panel ids;
W = min(spec.window, L). Every tensor is on ``plan.device``; host-side copies are marked *host*.
The plan holds what every backend reads; a backend derives its own view once per plan
(:meth:`BatchPlan.derived`), e.g. the torch backend's all-cell rows for its fused batch kernel.
Building the plan syncs with the device once; a layer call using it needs no further host sync.

A backend on a plan
-------------------
:func:`attnprof.kernels.planned_stats` (q, k, v ``[B, H, L, D]``, the plan, a list of
:class:`~.reduce.Target`) calls the backend, which returns the output and a
:class:`~.reduce.CellResults` (per counted cell, in ``counted`` order: head summaries ``[C, H, 4]``,
window ``[C, H, W, W]`` in position coordinates, received ``[U, H]`` per (cell, gene) pair, panel pair
means ``[C, H, K, K]``, whole-context maps ``[C, H, NB, NB]``); :func:`~.reduce.reduce_into` then adds them and their counts
(``cell_counts``) into every target's labelings (matmuls of ``onehot``: one per target for sums laid
out by :func:`~.reduce.tiled_zeros`, one per statistic otherwise). Helpers that turn a backend's
natural layout into CellResults: :func:`~.reduce.received_pairs` (from ``[C, H, L]`` column means)
and :func:`~.reduce.pair_means` (from ``[C, H, M, M]`` = P at ``panel_pos``).

Fields
------
spec          the :class:`StatsSpec`.
B, L          batch shape (host ints); ``n_labelings`` = N + 1, ``n_groups`` = G, ``window`` = W.
padding       ``[B, L]`` bool, True = padding (every cell has at least one real token).
real          ``[B, L]`` bool, ``~padding``.
labelings     ``[N + 1, B]`` int64 group codes in ``[0, G)`` or -1 (not counted in that labeling).
lengths       ``[B]`` int64 real tokens per cell.
cu_seqlens    ``[B + 1]`` int32 offsets of each cell's real tokens in the packed layout (all cells, in
              batch order; a varlen kernel's ``cu_seqlens``). ``max_len``: host int, ``lengths.max()``.
token_index   ``[T]`` int64 flat index ``b * L + position`` of every real token, packed in that order:
              ``x.transpose(1, 2).reshape(B * L, H, D)[token_index]`` packs q, k or v.
positions     ``[T]`` int64 position (in ``[0, L)``) of each packed token in its cell.
counted       ``[C]`` int64 batch rows of the counted cells, ascending: the per-cell results of a
              backend (summary, received, window, pair block) have one row per counted cell, in
              this order. ``counted_host``: the same as a host list.
groups        ``[N + 1, C]`` int64 ``labelings[:, counted]``.
onehot        ``[C, (N + 1) * G]`` float64: ``onehot[c, l * G + g] = 1`` iff counted cell c is in
              group g of labeling l. The (labeling, group) pair is one wide group axis: every group
              sum of every labeling is one matmul ``onehot.T @ x`` over the counted cells.
present       ``[P]`` int64 the columns of ``onehot`` that hold a cell, ascending (``host["present"]``: a list):
              the only rows of the sums a batch changes (P <= C), so adding into them costs the same for 2
              groups or 2,000 blocks.
n_window      ``[C]`` int64 real positions < W of each counted cell (positions < W that are real).
n_context     ``[C]`` int64 real positions < spec.n_context of each counted cell.
genes         ``[V_b]`` int64 sorted token ids held by real tokens of counted cells: the batch's gene
              axis. Gene sums of :func:`planned_stats` run over it, not over the whole vocabulary.
gene_src      ``[T_c]`` int64 flat index ``c * L + position`` (into a per-counted-cell ``[C, L]`` array)
              of every real token of a counted cell.
gene_pairs    ``[T_c]`` int64 the ``(counted cell, gene)`` pair of each of those tokens (occurrences of
              an id in one cell share one pair): ``received_pairs`` index_adds by it.
pair_cell     ``[U]`` int64 counted cell of each pair; ``pair_gene``: ``[U]`` slot into ``genes``;
              pairs are sorted by gene, then cell (``pair_gene`` is non-decreasing).
panel_pos     ``[C, M]`` int64 positions (in ``[0, L)``) where each counted cell holds panel ids,
              ascending, -1 past the cell's count; M = the most any cell holds (0 without a panel).
panel_member  ``[C, K, M]`` float64: panel id k sits at ``panel_pos[c, m]``.
counts        (computed when asked) the q, k, v-free sums of all labelings, float64, labeling axis first: ``cells
              [N+1, G]``, ``pos_count [N+1, G, W', W']`` (W' = spec.window), ``recv_count
              [N+1, G, V_b]``, ``pair_count [N+1, G, K, K]``.
maps          the whole-context maps' binning (:class:`~.maps.MapPlan`), None without maps
              (``spec.map_bins`` 0); ``counts`` and ``cell_counts`` then hold ``map_count`` too.
cell_counts   what each counted cell adds to ``counts``, float64 ``[C, ...]`` flattened: ``cells [C, 1]``
              (ones), ``pos_count [C, W'^2]``, ``recv_count [C, V_b]`` (genes present), ``pair_count
              [C, K^2]`` (``counts`` = ``onehot.T @ cell_counts``): the reduction adds the counts in the
              same matmul as the layer's results.
host          host lists for CPU loops: ``lengths`` (per batch row); ``counted_lengths``, ``n_window``,
              ``n_context``, ``panel_count`` and ``window_prefix`` (per counted cell: its real positions < W are
              exactly ``0 .. n_window - 1``, so its window is a plain slice).
cache         what is derived from the plan on first use (:meth:`BatchPlan.derived`: per head count or chunk size,
              a backend's kernel inputs, e.g. ``cu`` = ``cu_seqlens`` as a host list): the one cache of a
              forward's derived state, dropped with the plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .maps import MapPlan, build_maps
from .reduce import panel_positions
from .spec import StatsSpec, check_batch


@dataclass(frozen=True, eq=False)
class BatchPlan:
    spec: StatsSpec
    B: int
    L: int
    n_labelings: int
    padding: torch.Tensor
    real: torch.Tensor
    labelings: torch.Tensor
    lengths: torch.Tensor
    cu_seqlens: torch.Tensor
    max_len: int
    token_index: torch.Tensor
    positions: torch.Tensor
    counted: torch.Tensor
    counted_host: list
    groups: torch.Tensor
    onehot: torch.Tensor
    present: torch.Tensor
    n_window: torch.Tensor
    n_context: torch.Tensor
    genes: torch.Tensor
    gene_pairs: torch.Tensor
    gene_src: torch.Tensor
    pair_cell: torch.Tensor
    pair_gene: torch.Tensor
    panel_pos: torch.Tensor
    panel_member: torch.Tensor
    host: dict
    tokens: torch.Tensor | None = None
    cell_counts: dict = None
    maps: MapPlan | None = None
    cache: dict = field(default_factory=dict)  # derived per head count / chunk size, on first use

    @property
    def device(self) -> torch.device:
        return self.padding.device

    @property
    def n_groups(self) -> int:
        return self.spec.n_groups

    @property
    def window(self) -> int:
        return min(self.spec.window, self.L)

    @property
    def n_counted(self) -> int:
        return len(self.counted_host)

    @property
    def counts(self) -> dict:
        """The q, k, v-free sums of all labelings (``onehot.T @ cell_counts``), computed when asked: the
        reduction adds ``cell_counts`` in the same matmul as each layer's results."""
        n, G, W, K = self.n_labelings, self.n_groups, self.spec.window, len(self.spec.panel)
        NB = self.spec.map_bins
        tail = {"cells": (), "pos_count": (W, W), "recv_count": (self.genes.numel(),), "pair_count": (K, K),
                "map_count": (NB, NB)}
        return {k: (self.onehot.T @ v).reshape(n, G, *tail[k]) for k, v in self.cell_counts.items()}

    def check_fits(self, q: torch.Tensor) -> None:
        """Refuse a layer's ``q [B, H, L, D]`` of another batch than the plan's (shape or device)."""
        B, _, L, _ = q.shape
        if (B, L) != (self.B, self.L) or q.device != self.device:
            raise ValueError(
                f"q has {B} cells of {L} positions on {q.device}, but the batch plan is for {self.B} cells of "
                f"{self.L} positions on {self.device}: build the plan from this batch"
            )

    def derived(self, key, make):
        """``make()``, computed at its first use on this plan and kept in its cache under ``key`` (a name, or a
        tuple of a name and ints): the one place a backend, the features or the reduction keep what they derive
        from a plan, so it lives exactly as long as the plan."""
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    def cache_cu(self) -> list[int]:
        """``cu_seqlens`` as a host list (for CPU loops), once."""
        return self.derived("cu", self.cu_seqlens.tolist)


def build_plan(
    spec: StatsSpec,
    labelings,
    key_padding_mask=None,
    tokens=None,
    *,
    shape: tuple[int, int] | None = None,
    device=None,
) -> BatchPlan:
    """The plan of one batch: checks the inputs (clear ``ValueError`` naming the problem) and derives
    every q, k, v-free fact once.

    labelings: ``[N + 1, B]`` group codes, one row per labeling, or ``[B]`` for one.
    key_padding_mask: ``[B, L]`` bool (True = padding) or None; tokens: ``[B, L]`` token ids
    (needed when ``spec.vocab_size`` is set). shape: ``(B, L)`` when neither mask nor tokens gives
    it (or to check them against). device: where the plan's tensors live (default: the mask's).
    """
    labelings, padding, tokens = check_batch(spec, labelings, key_padding_mask, tokens, shape, device)
    dev = padding.device
    B, L = padding.shape
    G, W = spec.n_groups, min(spec.window, L)
    n_lab = labelings.shape[0]
    real = ~padding
    lengths = real.sum(1)
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    token_index = real.reshape(-1).nonzero().flatten()
    positions = token_index % L

    counted = (labelings >= 0).any(0).nonzero().flatten()
    groups = labelings[:, counted]
    C = counted.numel()
    onehot = (groups.T[:, :, None] == torch.arange(G, device=dev)).reshape(C, n_lab * G).double()
    creal = real[counted]
    n_window = creal[:, :W].sum(1)
    n_context = creal[:, : min(spec.n_context, L)].sum(1)
    window_prefix = creal[:, :W].long().cumsum(1).eq(torch.arange(1, W + 1, device=dev)).sum(1) == n_window

    both = creal[:, :W].double()
    pc = torch.zeros(C, spec.window, spec.window, dtype=torch.float64, device=dev)
    pc[:, :W, :W] = both[:, :, None] * both[:, None, :]
    cell_counts = {"cells": onehot.new_ones(C, 1), "pos_count": pc.reshape(C, spec.window**2)}

    empty = torch.zeros(0, dtype=torch.long, device=dev)
    genes, gene_pairs, gene_src, pair_cell, pair_gene = empty, empty, empty, empty, empty
    if spec.gene_stats:
        ctoks = tokens[counted]
        cell, pos = creal.nonzero(as_tuple=True)
        ids = ctoks[cell, pos]
        genes, slot = ids.unique(return_inverse=True)
        V = genes.numel()
        # one pair per (cell, id) present, sorted by gene then cell
        pairs, gene_pairs = (slot * C + cell).unique(return_inverse=True)
        pair_gene, pair_cell = pairs // C, pairs % C
        gene_src = cell * L + pos
        presence = torch.zeros(C, V, dtype=torch.float64, device=dev)
        presence[pair_cell, pair_gene] = 1.0
        cell_counts["recv_count"] = presence

    K = len(spec.panel)
    panel_pos = torch.zeros(C, 0, dtype=torch.long, device=dev)
    panel_member = torch.zeros(C, K, 0, dtype=torch.float64, device=dev)
    if spec.panel:
        panel = torch.tensor(spec.panel, dtype=torch.long, device=dev)
        panel_pos, panel_member = panel_positions(tokens[counted], creal, panel)
        present = (panel_member.sum(-1) > 0).double()
        pairs = (present[:, :, None] * present[:, None, :]).reshape(C, K * K)
        cell_counts["pair_count"] = pairs

    maps = None
    if spec.map_bins:
        maps, cell_counts["map_count"] = build_maps(spec, real, counted)

    present = onehot.any(0).nonzero().flatten()
    host = {
        "lengths": lengths.tolist(),
        "counted_lengths": lengths[counted].tolist(),
        "n_window": n_window.tolist(),
        "n_context": n_context.tolist(),
        "panel_count": (panel_pos >= 0).sum(1).tolist(),
        "window_prefix": window_prefix.tolist(),
        "present": present.tolist(),
    }
    return BatchPlan(
        spec=spec, B=B, L=L, n_labelings=n_lab, padding=padding, real=real, labelings=labelings,
        lengths=lengths, cu_seqlens=cu_seqlens, max_len=max(host["lengths"]), token_index=token_index,
        positions=positions, counted=counted, counted_host=counted.tolist(), groups=groups, onehot=onehot,
        present=present, n_window=n_window, n_context=n_context, genes=genes,
        gene_pairs=gene_pairs, gene_src=gene_src, pair_cell=pair_cell, pair_gene=pair_gene,
        panel_pos=panel_pos, panel_member=panel_member, host=host, tokens=tokens, cell_counts=cell_counts, maps=maps,
    )  # fmt: skip
