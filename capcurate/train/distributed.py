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
