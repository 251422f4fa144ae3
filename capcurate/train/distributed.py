"""DDP set-up from torchrun's environment, and ``capcurate train --nproc N`` launching torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group torchrun describes (nccl on GPUs, gloo on CPU); a no-op for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if want.startswith("cuda"):
        dev = torch.device("cuda", local if world > 1 else (torch.device(want).index or 0))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(want)
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank, local, world, dev)


def group_active() -> bool:
    """Whether a process group is initialised (torchrun ranks; tests that set one up themselves)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def collective_device(info: DistInfo) -> torch.device:
    """Where a collective's tensors must live: this rank's GPU under NCCL, the CPU under gloo."""
    if group_active() and torch.distributed.get_backend() == "nccl":
        if info.device.type == "cuda":
            return info.device
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(info: DistInfo, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``t`` summed (or min-reduced) over the ranks, as a new tensor on the collective device.

    Runs whenever a process group is initialised, a 1-rank group too; without one returns a copy.
    """
    if not group_active():
        return t.clone()
    x = t.to(collective_device(info), copy=True)
    ops = {"sum": torch.distributed.ReduceOp.SUM, "min": torch.distributed.ReduceOp.MIN}
    torch.distributed.all_reduce(x, op=ops[op])
    return x


def local_world_size() -> int:
    """Processes of this job on this machine (torchrun sets LOCAL_WORLD_SIZE); 1 otherwise."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))


def barrier(info: DistInfo) -> None:
    if info.distributed:
        torch.distributed.barrier()


def all_gather_object(info: DistInfo, obj):
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_object(info: DistInfo, obj):
    if not info.distributed:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def cleanup(info: DistInfo) -> None:
    if info.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def launch_torchrun(nproc: int, train_args: list[str]) -> int:
    """Run ``torchrun --nproc-per-node nproc -m capcurate.train ARGS`` and return its exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "capcurate.train", *train_args]
    return subprocess.call(cmd)
