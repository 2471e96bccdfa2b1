"""The performance targets, each checked against a workload's result.

A target whose paths did not run, or computed a wrong meta-gradient, reads ``n/a``: a fast
wrong answer passes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple, Union

from .entry import EntryResult
from .memory import MemoryResult
from .paths import BATCHED, COMPILED, FUNC, HIGHER, LEGACY
from .report import TimingResult

Result = Union[TimingResult, MemoryResult, EntryResult]
Verdict = Tuple[str, Optional[bool]]  # what was measured, and whether the target is met


@dataclass(frozen=True)
class Target:
    workload: str
    text: str
    check: Callable[[Result], Verdict]


def faster_than_higher(path: str, factor: float) -> Callable[[TimingResult], Verdict]:
    def check(result: TimingResult) -> Verdict:
        if not _usable(result, path, HIGHER):
            return "n/a", None
        speedup = result.samples.speedup(path, HIGHER)
        return f"{speedup:.2f}x", speedup >= factor

    return check


def peak_not_above(label: str, baseline: str) -> Callable[[MemoryResult], Verdict]:
    def check(result: MemoryResult) -> Verdict:
        if label not in result.bytes or baseline not in result.bytes:
            return "n/a", None
        mine, theirs = result.peak(label), result.peak(baseline)
        return f"{mine / 1024:.1f} vs {theirs / 1024:.1f} KiB", mine <= theirs

    return check


def no_growth(paths=(LEGACY, BATCHED)) -> Callable[[MemoryResult], Verdict]:
    """The peak at the most steps is at most 1% above the peak at the fewest."""

    def check(result: MemoryResult) -> Verdict:
        fewest, most = min(result.config["step_counts"]), max(result.config["step_counts"])
        shown, ok = [], True
        for path in paths:
            low, high = result.peak(f"{path}@{fewest}"), result.peak(f"{path}@{most}")
            shown.append(f"{path} {low / 1024:.1f} -> {high / 1024:.1f} KiB")
            ok = ok and high <= 1.01 * low
        return "; ".join(shown), ok

    return check


def _usable(result: TimingResult, *paths: str) -> bool:
    return all(p in result.samples.seconds and p not in result.wrong() for p in paths)


def entry_at_most(path: str, us: float) -> Callable[[EntryResult], Verdict]:
    def check(result: EntryResult) -> Verdict:
        if path not in result.samples.seconds:
            return "n/a", None
        cost = result.us_per_task(path)
        return f"{cost:.1f} us per task", cost <= us

    return check


def at_least_as_fast_as(path: str, other: str) -> Callable[[TimingResult], Verdict]:
    def check(result: TimingResult) -> Verdict:
        if not _usable(result, path, other):
            return "n/a", None
        speedup = result.samples.speedup(path, other)
        return f"{speedup:.2f}x {other}'s speed", speedup >= 1.0

    return check


TARGETS: List[Target] = [
    Target("W1", "legacy >= 1.6x faster than higher", faster_than_higher(LEGACY, 1.6)),
    Target("W1", "batched >= 10x faster than higher", faster_than_higher(BATCHED, 10.0)),
    Target("W1", "batched as fast as hand-written vmap", at_least_as_fast_as(BATCHED, FUNC)),
    Target("W1", "compiled >= 22x faster than higher", faster_than_higher(COMPILED, 22.0)),
    Target("W2", "legacy at least as fast as higher", faster_than_higher(LEGACY, 1.0)),
    Target("W2", "batched at least as fast as higher", faster_than_higher(BATCHED, 1.0)),
    Target("W3", "legacy >= 1.4x faster than higher", faster_than_higher(LEGACY, 1.4)),
    Target("W4", "legacy at least as fast as higher", faster_than_higher(LEGACY, 1.0)),
    Target("W4", "batched at least as fast as legacy", at_least_as_fast_as(BATCHED, LEGACY)),
    Target("E1", "entering innerloop_ctx <= 20 us per task (legacy)", entry_at_most(LEGACY, 20.0)),
    Target("M1", "peak memory: higher_func legacy <= higher", peak_not_above(LEGACY, HIGHER)),
    Target("M2", "track_higher_grads=False: no growth for higher_func", no_growth()),
]


def evaluate(results: dict) -> List[tuple]:
    """``(workload, text, measured, verdict)`` for every target whose workload ran."""
    rows = []
    for target in TARGETS:
        result = results.get(target.workload)
        if result is None:
            continue
        measured, ok = target.check(result)
        rows.append((target.workload, target.text, measured, _word(ok)))
    return rows


def _word(ok: Optional[bool]) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")
