"""The profiled layer call as one ``torch.library`` custom op, so that a profiled model runs under
``torch.compile``. The triton layer call never syncs, so the op itself does not stand in the way of CUDA-graph
capture; the model around it still breaks the graph (docs/gpu.md, section 3).

``attnprof::profiled_attention(q, k, v, key_padding_mask?, sums[], handle, layer, scale?) -> out``

- returns the attention output (a new tensor, the dtype and shape of ``q``); its fake implementation
  says just that, so the compiler traces the model around it without running the kernels;
- mutates ``sums``: the distinct storage buffers of the layer's run sums (the accumulator's, which
  keeps the dense sums in one buffer and the gene sums in another), declared in ``mutates_args`` so the
  compiler orders the call and writes them back after a functionalized call (``aot_eager``,
  ``inductor``) as it does for any in-place op. The implementation adds the layer's sums into
  *the tensors it is given* (views of them rebuilt at the layer's own offsets), never into others;
- ``handle`` names the profiling recorder (an id registered by :func:`compiled_attend`), whose
  per-forward state (the batch plan, the call counts; the accumulator's NaN/Inf verdicts) lives in
  Python objects the graph never reads.

A layer's sums are allocated at its first call (their shape needs the head count): that call passes no
buffers (nothing of the graph's is mutated) and later calls pass them, so the compiler retraces once
after the first forward.

Wiring: ``Recorder.attend`` starts with ``if torch.compiler.is_compiling(): return compiled_attend(self,
layer, q, k, v, key_padding_mask, scale)``; the op's implementation then calls ``attend`` eagerly.
"""

from __future__ import annotations

import contextlib
import weakref

import torch

#: handle -> weak reference to the recorder (a recorder's handle is its id while it lives)
_RECORDERS: dict[int, weakref.ref] = {}
#: (handle, layer) -> the distinct buffers of the layer's sums, as the last eager call left them
_BUFFERS: dict[tuple[int, str], list[torch.Tensor]] = {}


@torch.library.custom_op("attnprof::profiled_attention", mutates_args=("sums",))
def profiled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    sums: list[torch.Tensor],
    handle: int,
    layer: str,
    scale: float | None,
) -> torch.Tensor:
    ref = _RECORDERS.get(handle)
    recorder = None if ref is None else ref()
    if recorder is None:
        raise RuntimeError("attnprof::profiled_attention: its profiling session has ended (no recorder)")
    with _given_buffers(recorder, layer, sums):
        out = recorder.attend(layer, q, k, v, key_padding_mask=key_padding_mask, scale=scale)
    _BUFFERS[handle, layer] = layer_buffers(recorder, layer)
    return out.clone() if _aliases(out, (q, k, v)) else out


@profiled_attention.register_fake
def _(q, k, v, key_padding_mask, sums, handle, layer, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def compiled_attend(recorder, layer: str, q, k, v, key_padding_mask=None, scale=None) -> torch.Tensor:
    """``recorder.attend`` as the custom op: what ``Recorder.attend`` runs while ``torch.compile`` traces it."""
    handle = id(recorder)
    if handle not in _RECORDERS:
        _register(recorder)
    sums = _BUFFERS.get((handle, layer), [])
    return torch.ops.attnprof.profiled_attention(q, k, v, key_padding_mask, sums, handle, layer,
                                                 None if scale is None else float(scale))  # fmt: skip


@torch.compiler.disable
def _register(recorder) -> None:
    handle = id(recorder)
    _RECORDERS[handle] = weakref.ref(recorder, lambda _: _forget(handle))


def _forget(handle: int) -> None:
    _RECORDERS.pop(handle, None)
    for key in [key for key in _BUFFERS if key[0] == handle]:
        del _BUFFERS[key]


def layer_buffers(recorder, layer: str) -> list[torch.Tensor]:
    """The distinct storage buffers of the layer's sums (none before its first call), in a fixed order."""
    acc = recorder.accumulator
    return [] if acc is None else acc.buffers(layer)


def _given_buffers(recorder, layer: str, given: list[torch.Tensor]):
    """The layer's sums as views of ``given`` (what the compiled graph passed: the buffers themselves, or their
    functionalized copies) for the call's duration."""
    acc = recorder.accumulator
    return contextlib.nullcontext() if acc is None or not given else acc.rebased(layer, given)


def _aliases(out: torch.Tensor, inputs) -> bool:
    return any(out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for x in inputs)
