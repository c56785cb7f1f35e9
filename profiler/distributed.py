"""Profiles across the ranks of a ``torch.distributed`` job: shard the cells, sum the sums.

Every statistic is a sum, so a job where each rank profiles its own cells and
the sums are all-reduced gives exactly the single-process result.
:func:`process_group` joins the job that ``torchrun`` describes in the
environment; :func:`attnprof.profile_anndata` shards and all-reduces by itself
inside an initialized default process group.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist

from .profile import Profile


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) outside a distributed job."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_by_torchrun() -> bool:
    """Whether the environment describes a job of more than one process (torchrun sets WORLD_SIZE and RANK)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_device() -> torch.device:
    """This process's GPU under torchrun (``cuda:LOCAL_RANK``), else ``cuda``, or the CPU without one."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


@contextmanager
def process_group(device) -> Iterator[tuple[int, int]]:
    """Join the torchrun job of the environment, if any, for the duration; yields (rank, world size).

    gloo for a CPU ``device``, nccl for a GPU. Outside torchrun, or when the default group is
    already initialized (by the caller), nothing is set up or torn down.
    """
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        yield rank_and_world()
        return
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed: run without torchrun")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # nccl's collectives run on the current device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield rank_and_world()
    finally:
        dist.destroy_process_group()


def shard(n: int, rank: int, world: int) -> np.ndarray:
    """Indices of the cells rank ``rank`` of ``world`` profiles: every world-th cell, so shards stay balanced."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world}")
    return np.arange(rank, n, world)


def all_reduce_profile(profile: Profile) -> Profile:
    """The sum of every rank's profile, on every rank (one all-reduce of one flat float64 buffer).

    Refuses, on every rank, profiles whose layout, blocks or model differ between ranks. The result has no
    ``cell_ids`` (unknown: merging it is not checked for shared cells).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("all_reduce_profile needs torch.distributed initialized (e.g. run under torchrun)")
    mine = json.dumps({"layout": profile.layout(), "blocks": profile.blocks.to_json(), "model": profile.meta.get("model")},
                      sort_keys=True, default=str)  # fmt: skip
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    differ = [r for r, other in enumerate(everyone) if other != everyone[0]]
    if differ:
        raise ValueError(f"ranks {differ} profiled a different layout or model than rank 0: cannot sum them")
    names = sorted(profile.sums)
    flat = torch.cat([torch.from_numpy(np.ascontiguousarray(profile.sums[k])).ravel() for k in names])
    flat = flat.to(_collective_device())
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat = flat.cpu().numpy()
    out: dict[str, np.ndarray] = {}
    offset = 0
    for k in names:
        shape = profile.sums[k].shape
        size = int(np.prod(shape))
        out[k] = flat[offset : offset + size].reshape(shape)
        offset += size
    meta = dict(profile.meta, world_size=dist.get_world_size())
    return Profile(out, **{**profile._fields(), "meta": meta})


def sum_over_ranks(value: int) -> int:
    """The sum of an integer over the ranks (``value`` itself outside a distributed job)."""
    if not (dist.is_available() and dist.is_initialized()):
        return int(value)
    total = torch.tensor([int(value)], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return int(total.item())


def _collective_device() -> torch.device:
    """Where collective buffers must live: the current GPU for nccl, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
