"""Timing several implementations of one step side by side, on a noisy shared machine.

Timing each path in its own block would charge every change in the machine's load (other
processes on the same two cores) to whichever path happened to run then. Instead every round
runs each path once, back to back, starting from a different path each round; a path's time is
the median over rounds, and its speedup over a baseline is the median over rounds of the
*paired* ratio ``baseline_time / path_time`` from the same round, which cancels slow drifts in
the machine's load.

Within a round a path runs a short *block* of consecutive calls, timed together (as many as
fill ``block_s`` seconds, counted once from the warm-up; one call for slow steps). A single
call of a step of a few milliseconds right after another path would run with that path's
data in the CPU caches and measure a cold start a training loop never sees; a block measures
the steady state, which is what consecutive meta-steps cost.

The cyclic garbage collector runs before every block, outside the timed region, so that one
path's garbage is never collected (and charged) while another path is being timed.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping


@dataclass
class Samples:
    """Wall-clock seconds of each path, one entry per round (all lists are the same length)."""

    seconds: Dict[str, List[float]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        """The median time of ``name``, in seconds."""
        return statistics.median(self.seconds[name])

    def speedup(self, name: str, baseline: str) -> float:
        """How many times faster ``name`` is than ``baseline``: the median paired ratio."""
        pairs = zip(self.seconds[baseline], self.seconds[name])
        return statistics.median(b / t for b, t in pairs)


def interleaved(
    steps: Mapping[str, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    block_s: float = 0.05,
) -> Samples:
    """Time every callable in ``steps`` over ``rounds`` interleaved rounds.

    Args:
        steps: name -> a callable running one step (a whole meta-step here); called with no
            arguments, its result is ignored.
        rounds: how many timed blocks each callable gets.
        warmup: untimed rounds first (lazy initialisation, allocator and cache warm-up).
        block_s: the least duration of a timed block of consecutive calls.

    Returns:
        The per-call time of every callable in every round (a block's time over its calls).

    Example:
        >>> samples = interleaved({"a": step_a, "b": step_b}, rounds=7)
        >>> samples.speedup("b", baseline="a")
    """
    names = list(steps)
    calls = {name: 1 for name in names}
    for _ in range(max(warmup, 1)):
        for name in names:
            begin = time.perf_counter()
            steps[name]()
            calls[name] = max(1, math.ceil(block_s / (time.perf_counter() - begin)))
    samples = Samples({name: [] for name in names})
    for r in range(rounds):
        # Rotate the starting path so that none is always first (or last) in a round.
        start = r % len(names)
        for name in names[start:] + names[:start]:
            step, count = steps[name], calls[name]
            gc.collect()
            begin = time.perf_counter()
            for _ in range(count):
                step()
            samples.seconds[name].append((time.perf_counter() - begin) / count)
    return samples
