"""The common runner: time a side through capcurate.events, repeat sides alternately, gate, record.

A *row* compares capcurate with one or more baselines doing the same work. Each side is a callable
``side(rep) -> Measure``; the runner calls the sides 3 times, alternating which goes first
(capcurate, baseline, ..., then baseline, ..., capcurate), so drift (clocks, page cache, other load)
does not favour one side. After each capcurate repeat the row's gate checks the output; a gate that
fails, or a side that raises, fails the row, and a failed row fails the run (``main`` exits 1).
"""

from __future__ import annotations

import contextlib
import statistics
import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .bound import BusySampler, fraction_of_bound, mean_or_none, peak_flops

ROOT = Path(__file__).resolve().parents[2]
REPEATS = 3


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(device: str) -> None:
    """Wait for the device, so a time mark counts the work queued before it."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


@dataclass
class Measure:
    """One repeat of one side: items done, seconds, and the output the gate reads."""

    items: int
    seconds: float
    output: Any = None
    steady_per_s: float | None = None  # items/s after the first batch (start-up left out), when known

    @property
    def per_s(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else 0.0


class BatchClock:
    """An events listener: a synchronised time mark at every batch/step boundary the stage announces."""

    def __init__(self, device: str):
        self.device = device
        self.marks: list[tuple[float, int]] = []

    def __call__(self, kind: str, n: int) -> None:
        if kind in ("batch", "step"):
            sync(self.device)
            self.marks.append((time.perf_counter(), n))

    def steady_per_s(self) -> float | None:
        """Items/s from the first boundary to the last (the first batch, with its start-up, left out)."""
        if len(self.marks) < 2:
            return None
        items = sum(n for _, n in self.marks[1:])
        span = self.marks[-1][0] - self.marks[0][0]
        return items / span if span > 0 else None


def timed_stage(call: Callable[[], Any], device: str) -> tuple[Any, float, BatchClock]:
    """Run a capcurate stage call, timed end to end and at each batch boundary it announces."""
    from capcurate import events

    clock = BatchClock(device)
    with events.listening(clock):
        sync(device)
        t0 = time.perf_counter()
        out = call()
        sync(device)
        seconds = time.perf_counter() - t0
    return out, seconds, clock


def timed(call: Callable[[], Any], device: str) -> tuple[Any, float]:
    """Run a baseline call between two synchronised time marks."""
    sync(device)
    t0 = time.perf_counter()
    out = call()
    sync(device)
    return out, time.perf_counter() - t0


Side = Callable[[int], Measure]
Gate = Callable[[Any], list[str]]  # capcurate's output -> what is wrong (empty: the gate passes)


@dataclass
class Row:
    """One comparison: capcurate's side, its like-for-like baselines, the gate on capcurate's output."""

    family: str
    name: str
    unit: str
    what: str
    capcurate: Side
    baselines: dict[str, Side]
    gate: Gate
    skipped: dict[str, str] = field(default_factory=dict)  # baseline -> why it did not run here
    target: str = ""
    device: str = "cpu"  # where capcurate's side computes: GPU busy is sampled and a peak looked up on cuda
    precision: str = "fp32"  # the model's precision on that device: picks the peak (bound.PEAK)
    # FLOPs per item, counted once after the repeats (bound.count_flops): {"per_item": FLOPs, "how": what
    # was counted, ...details}; None for rows whose work is not a model (the input row)
    flops: Callable[[], dict[str, Any]] | None = None


def spread(values: list[float]) -> dict[str, Any]:
    return {"repeats": values, "min": min(values), "median": statistics.median(values), "max": max(values)}


def busy_side(side: Side, enabled: bool, busy: list[dict[str, Any]]) -> Side:
    """``side`` with GPU busy sampled while it runs: appends {"pct": the whole repeat, "steady_pct": from
    the stage's first batch/step boundary to its last (when it announced two), "source"} to ``busy``."""

    def run(rep: int) -> Measure:
        from capcurate import events

        marks: list[float] = []

        def mark(kind: str, n: int) -> None:
            if kind in ("batch", "step"):
                marks.append(time.time())

        sampler = BusySampler(enabled).start()
        t0 = time.time()
        try:
            with events.listening(mark):
                return side(rep)
        finally:
            t1 = time.time()
            sampler.stop()
            busy.append(
                {
                    "pct": sampler.mean(t0, t1),
                    "steady_pct": sampler.mean(marks[0], marks[-1]) if len(marks) > 1 else None,
                    "source": sampler.source,
                }
            )

    return run


def flop_bound(row: Row, ours: dict[str, Any]) -> dict[str, Any]:
    """FLOPs per item (counted now, after the repeats), the card's peak, the fraction of it capcurate got."""
    info: dict[str, Any] | None = None
    if row.flops is not None:
        try:
            info = row.flops()
        except Exception as e:  # a counting bug loses the bound, not the row's timings
            info = {"error": f"{type(e).__name__}: {e}"}
            log(f"  FLOP count FAILED\n{traceback.format_exc(limit=6)}")
    per_item = (info or {}).get("per_item") or None
    peak = peak_flops(card(), row.precision) if row.device.startswith("cuda") else None
    median = ours.get("per_s", {}).get("median")
    steady = ours.get("steady_per_s", {}).get("median")
    return {
        "flops_per_item": per_item,
        "flops": info,
        "precision": row.precision,
        "peak_card": peak[0] if peak else None,
        "peak_flops": peak[1] if peak else None,
        "fraction_of_bound": fraction_of_bound(median, per_item, peak and peak[1]),
        "fraction_of_bound_steady": fraction_of_bound(steady, per_item, peak and peak[1]),
    }


def _pct(x: float | None, scale: float = 1.0) -> str:
    return "n/a" if x is None else f"{x * scale:.1f}%"


def run_row(row: Row, repeats: int = REPEATS) -> dict[str, Any]:
    """Run the row's sides ``repeats`` times, alternating the order; gate every capcurate output.
    GPU busy is sampled during each capcurate repeat; FLOPs are counted once, after the repeats."""
    busy: list[dict[str, Any]] = []
    ours_side = busy_side(row.capcurate, row.device.startswith("cuda"), busy)
    sides: dict[str, Side] = {"capcurate": ours_side, **row.baselines}
    per_s: dict[str, list[float]] = {k: [] for k in sides}
    steady: dict[str, list[float]] = {k: [] for k in sides}
    failures: list[str] = []
    order = list(sides)
    log(f"row {row.name}: {row.what}")
    for rep in range(repeats):
        ours_done: list[Measure] = []
        for key in order if rep % 2 == 0 else order[::-1]:
            try:
                m = sides[key](rep)
            except Exception as e:  # a crashed side fails the row, never posts a rate
                failures.append(f"{key} repeat {rep}: {type(e).__name__}: {e}")
                log(f"  {key} repeat {rep} FAILED\n{traceback.format_exc(limit=6)}")
                continue
            if key == "capcurate":
                ours_done.append(m)
            per_s[key].append(m.per_s)
            if m.steady_per_s is not None:
                steady[key].append(m.steady_per_s)
            log(
                f"  {key} repeat {rep}: {m.items} {row.unit} in {m.seconds:.3f} s = {m.per_s:.1f}/s"
                + (f" (steady {m.steady_per_s:.1f}/s)" if m.steady_per_s else "")
            )
        # gated once the round is over, so gates that compare with a baseline's output always have it
        for m in ours_done:
            try:
                failures += [f"gate, repeat {rep}: {p}" for p in row.gate(m.output)]
            except Exception as e:  # a gate that cannot read the output is a failed gate
                failures.append(f"gate, repeat {rep}: {type(e).__name__}: {e}")
    sides_out = {
        k: {"per_s": spread(v), **({"steady_per_s": spread(steady[k])} if steady[k] else {})}
        for k, v in per_s.items()
        if v
    }
    ours = sides_out.get("capcurate", {}).get("per_s", {}).get("median")
    ratios = {
        k: ours / s["per_s"]["median"]
        for k, s in sides_out.items()
        if k != "capcurate" and ours and s["per_s"]["median"]
    }
    ours_steady = sides_out.get("capcurate", {}).get("steady_per_s", {}).get("median")
    steady_ratios = {
        k: ours_steady / s["steady_per_s"]["median"]
        for k, s in sides_out.items()
        if k != "capcurate" and ours_steady and s.get("steady_per_s", {}).get("median")
    }
    ok = not failures and "capcurate" in sides_out
    bound = flop_bound(row, sides_out.get("capcurate", {}))
    busy_pct = mean_or_none([b["pct"] for b in busy])
    busy_steady = mean_or_none([b["steady_pct"] for b in busy])
    gflop = bound["flops_per_item"]
    log(
        f"row {row.name}: {'ok' if ok else 'FAILED'}; capcurate/baseline (medians): "
        + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
        + f"\n  FLOP bound: {'n/a' if gflop is None else f'{gflop / 1e9:.4g} GFLOP/{row.unit[:-1]}'}, "
        + (
            f"{_pct(bound['fraction_of_bound'], 100)} of {bound['peak_card']} {row.precision} "
            f"{bound['peak_flops'] / 1e12:.0f} TFLOP/s (steady {_pct(bound['fraction_of_bound_steady'], 100)})"
            if bound["peak_flops"]
            else f"fraction of bound n/a (no peak for {card() if row.device.startswith('cuda') else 'the CPU'})"
        )
        + f"; GPU busy {_pct(busy_pct)} (steady {_pct(busy_steady)})"
        + "".join(f"\n  skipped {k}: {why}" for k, why in row.skipped.items())
        + "".join(f"\n  {f}" for f in failures)
    )
    return {
        "family": row.family,
        "row": row.name,
        "what": row.what,
        "unit": row.unit,
        "target": row.target,
        "ok": ok,
        "failures": failures,
        "sides": sides_out,
        "ratio_median": ratios,
        "ratio_steady_median": steady_ratios,
        "skipped": row.skipped,
        **bound,
        "gpu_busy_pct": busy_pct,  # mean over capcurate's repeats of each repeat's mean; None on the CPU
        "gpu_busy_steady_pct": busy_steady,
        "gpu_busy_repeats": busy,
    }


def card() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def provenance() -> dict[str, Any]:
    """The commit measured, whether the tree differed from it, and the card."""

    def git(*args: str) -> str:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        return ""

    import torch

    head = git("rev-parse", "HEAD").strip() or "unknown"
    # untracked files count too: a benchmark run from a tree with new modules is not HEAD
    dirty = (
        bool(git("status", "--porcelain", "--untracked-files=normal").strip()) if head != "unknown" else None
    )
    return {
        "head": head,
        "dirty": dirty,
        "card": card(),
        "torch": torch.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_report(path: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    from capcurate import atomic

    atomic.write_json(path, {**provenance(), **meta, "ok": all(r["ok"] for r in rows), "rows": rows})
