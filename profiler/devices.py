"""``--device`` checked before anything loads: a bad name, CUDA on a CPU build of torch, or a GPU index that
does not exist gets a message naming the problem and the fix instead of a traceback mid-run."""

from __future__ import annotations

import torch

#: Device types attnprof runs on.
SUPPORTED = ("cpu", "cuda", "mps")


def parse_device(name: str, option: str = "--device") -> torch.device:
    """The torch device of ``name`` (``auto``: this rank's GPU when there is one, else the CPU), usable here."""
    from .distributed import local_device

    if name == "auto":
        return local_device()
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{option} {name!r} is not a device name: use cpu, cuda, cuda:1, ... or auto") from None
    if device.type not in SUPPORTED:
        raise ValueError(f"{option} {name}: attnprof runs on {', '.join(SUPPORTED)}; use --device cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = (f"this torch ({torch.__version__}) is a CPU build" if torch.version.cuda is None
                   else "torch sees no CUDA GPU (check the driver and CUDA_VISIBLE_DEVICES)")  # fmt: skip
            raise ValueError(f"{option} {name}: {why}; use --device cpu, or install a CUDA build of torch")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"{option} {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{option} {name}: Apple's MPS is not available here; use --device cpu")
    return device
