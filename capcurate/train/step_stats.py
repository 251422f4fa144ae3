"""One optimizer step's loss statistics, kept on the device and read back only when needed.

Loss terms stay device tensors, accumulated over the micro-batches of a step and checked for NaN/inf
on the device; ``reduce_step_stats`` reads them back (one sync; under DDP one all-reduce of the terms and
skipped counts plus one of the first bad step, on the process group's device: cuda under NCCL).
"""

from __future__ import annotations

import torch

from .distributed import DistInfo, all_reduce, collective_device, group_active

NO_BAD_STEP = 2 ** 62  # "no step had a non-finite loss" (min-reduced over ranks)


class StepStats:
    """One optimizer step's loss terms, on the device; the first step whose loss was not finite."""

    def __init__(self, device: torch.device, accum: int):
        self.accum = accum
        self._acc: dict[str, torch.Tensor] | None = None
        self.terms: dict[str, torch.Tensor] = {}
        self.bad_step = torch.full((), NO_BAD_STEP, dtype=torch.long, device=device)
        self.bad_value = torch.zeros((), dtype=torch.float32, device=device)

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        """A micro-batch's terms (no sync)."""
        part = {k: v.detach().float() / self.accum for k, v in terms.items()}
        self._acc = part if self._acc is None else {k: self._acc[k] + v for k, v in part.items()}

    def end_step(self, step: int) -> None:
        """Close optimizer step ``step``: its terms become ``terms``; a NaN/inf is noted on the device."""
        self.terms, self._acc = self._acc or {}, None
        if not self.terms:
            return
        total = torch.stack(list(self.terms.values())).sum()
        newly = ~torch.isfinite(total) & (self.bad_step == NO_BAD_STEP)
        self.bad_step = torch.where(newly, step, self.bad_step)
        self.bad_value = torch.where(newly, total, self.bad_value)


def reduce_step_stats(dist: DistInfo, terms: dict[str, torch.Tensor], skipped: int, bad_step: torch.Tensor,
                      extra: dict[str, torch.Tensor] | None = None
                      ) -> tuple[dict[str, float], int, int, dict[str, float]]:
    """Read back one step's statistics: (terms averaged over ranks, skipped samples summed over ranks,
    first step with a non-finite loss over ranks or NO_BAD_STEP, ``extra`` values as they are here).

    With a process group (any size, 1 too) the terms and counts are all-reduced on the group's device
    (cuda under NCCL, the CPU under gloo); then a single device-to-host copy.
    """
    extra = extra or {}
    names = list(terms)
    dev = collective_device(dist) if group_active() else bad_step.device
    world = torch.distributed.get_world_size() if group_active() else 1
    vec = torch.stack([terms[k].detach().to(dev, torch.float64) for k in names]
                      + [torch.tensor(float(skipped), dtype=torch.float64, device=dev)])
    summed = all_reduce(dist, vec, "sum")
    first_bad = all_reduce(dist, bad_step.to(dev).view(1), "min")
    tail = [v.detach().to(dev, torch.float64).view(1) for v in extra.values()]
    out = torch.cat([summed, first_bad.to(torch.float64), *tail]).tolist()
    means = {k: v / world for k, v in zip(names, out, strict=False)}
    n = len(names)
    return means, int(round(out[n])), int(out[n + 1]), dict(zip(extra, out[n + 2:], strict=True))
