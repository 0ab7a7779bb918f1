"""Several processes with torch.distributed, started by torchrun: NCCL on CUDA, gloo on CPU.

One process is rank 0, the only one that writes files (checkpoints, logs, the privacy ledger, reports).
Every random draw that must agree across ranks is made from generators in the same state on every rank,
or made on rank 0 and broadcast. Collectives time out after `--dist-timeout` seconds, so a rank that dies
or hangs stops the others with an error instead of a run that never ends.

Checkpoints and the ledger are read by every rank at start: on several machines, `--out` must be on a
file system they share.
"""

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from ldm.errors import UserError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self):
        return self.rank == 0

    @property
    def enabled(self):
        return self.world > 1


def pick_device(name):
    """--device auto|cpu|cuda: auto takes CUDA when there is one; cuda without one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available; use --device cpu or auto")
    return torch.device(name)


def init_distributed(device, timeout_s):
    """Join the process group torchrun describes in the environment; a single process needs none.

    Returns (Dist, device): under torchrun on CUDA each process takes the GPU of its LOCAL_RANK.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                 timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(rank, world), device


def shutdown(dist):
    if dist.enabled and tdist.is_initialized():
        tdist.destroy_process_group()


def all_reduce_sum_(tensors, dist):
    """In place: every rank ends with the sum over ranks of each tensor."""
    if dist.enabled:
        for t in tensors:
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)


def broadcast_(tensor, dist):
    """In place: every rank ends with rank 0's tensor."""
    if dist.enabled:
        tdist.broadcast(tensor, src=0)
    return tensor


def barrier(dist):
    if dist.enabled:
        tdist.barrier()


def shard(n, dist):
    """This rank's part of a global batch of n rows: a slice, so every row has exactly one owner."""
    per = -(-n // dist.world)
    return slice(min(n, dist.rank * per), min(n, (dist.rank + 1) * per))
