"""Profiles across the ranks of a ``torch.distributed`` job: shard the cells, sum the sums.

Every statistic is a sum, so a job where each rank profiles its own cells and
the sums are all-reduced gives exactly the single-process result.
"""

from __future__ import annotations

import json

import numpy as np
import torch
import torch.distributed as dist

from .profile import Profile


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) outside a distributed job."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(n: int, rank: int, world: int) -> np.ndarray:
    """Indices of the cells rank ``rank`` of ``world`` profiles: every world-th cell, so shards stay balanced."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world}")
    return np.arange(rank, n, world)


def all_reduce_profile(profile: Profile) -> Profile:
    """The sum of every rank's profile, on every rank (one all-reduce of one flat float64 buffer).

    Refuses, on every rank, profiles whose layout or model differs between ranks.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("all_reduce_profile needs torch.distributed initialized (e.g. run under torchrun)")
    mine = json.dumps({"layout": profile.layout(), "model": profile.meta.get("model")}, sort_keys=True, default=str)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    differ = [r for r, other in enumerate(everyone) if other != everyone[0]]
    if differ:
        raise ValueError(f"ranks {differ} profiled a different layout or model than rank 0: cannot sum them")
    arrays = [profile.sums, *profile.null]
    names = [(i, k) for i, sums in enumerate(arrays) for k in sorted(sums)]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flat = torch.cat([torch.from_numpy(np.ascontiguousarray(arrays[i][k])).ravel() for i, k in names]).to(device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat = flat.cpu().numpy()
    out: list[dict[str, np.ndarray]] = [{} for _ in arrays]
    offset = 0
    for i, k in names:
        shape = arrays[i][k].shape
        size = int(np.prod(shape))
        out[i][k] = flat[offset : offset + size].reshape(shape)
        offset += size
    meta = dict(profile.meta, world_size=dist.get_world_size())
    return Profile(out[0], **{**profile._fields(), "meta": meta}, null=out[1:])
