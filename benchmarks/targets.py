"""The performance targets, each checked against a workload's result.

A target whose paths did not run, or computed a wrong meta-gradient, reads ``n/a``: a fast
wrong answer passes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple, Union

from .memory import MemoryResult
from .paths import BATCHED, COMPILED, HIGHER, LEGACY
from .report import TimingResult

Result = Union[TimingResult, MemoryResult]
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


def within_of_func(path: str, slack: float) -> Callable[[TimingResult], Verdict]:
    """``path`` takes at most ``1 + slack`` times the best hand-written torch.func's time."""

    def check(result: TimingResult) -> Verdict:
        best = result.best_func()
        if best is None or not _usable(result, path):
            return "n/a", None
        ratio = 1 / result.samples.speedup(path, best)
        return f"{ratio:.2f}x the time of {best}", ratio <= 1 + slack

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


TARGETS: List[Target] = [
    Target("W1", "legacy >= 2.0x faster than higher", faster_than_higher(LEGACY, 2.0)),
    Target("W1", "batched within 10% of hand-written torch.func", within_of_func(BATCHED, 0.10)),
    Target("W1", "batched >= 6x faster than higher", faster_than_higher(BATCHED, 6.0)),
    Target("W1", "compiled >= 20x faster than higher", faster_than_higher(COMPILED, 20.0)),
    Target("W2", "legacy >= 1.2x faster than higher", faster_than_higher(LEGACY, 1.2)),
    Target("W2", "batched >= 1.5x faster than higher", faster_than_higher(BATCHED, 1.5)),
    Target("W3", "legacy >= 1.5x faster than higher", faster_than_higher(LEGACY, 1.5)),
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
