"""Where each path's time goes: ``python -m benchmarks.profiling [--workload W1]``.

For every path of a workload it prints, per meta-step: the Python function calls and the
ATen ops it makes (from ``cProfile`` and ``torch.profiler``), the Python functions with the
most time of their own (with microseconds per call), and the ATen ops it calls more often
than the best hand-written torch.func path does, which is overhead the library adds on top
of the math.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import pstats
import time
from typing import Dict, Mapping, Tuple

import torch
from torch.profiler import ProfilerActivity, profile

from . import hyperlr, maml, omniglot, sinusoid
from .paths import BATCHED, FUNC, FUNC_AUTOGRAD, FUNC_LOOP, HIGHER, LEGACY, Path

PATHS = (HIGHER, LEGACY, FUNC_LOOP, BATCHED, FUNC, FUNC_AUTOGRAD)
# What each path's ATen ops are compared with: the hand-written path of the same shape.
BASELINE = {HIGHER: FUNC_LOOP, LEGACY: FUNC_LOOP, BATCHED: FUNC_AUTOGRAD, FUNC: FUNC_AUTOGRAD}


def build(workload: str) -> Dict[str, Path]:
    if workload == "W1":
        return maml.build(sinusoid.problem(), PATHS)
    if workload == "W2":
        return maml.build(omniglot.problem(), PATHS)
    if workload == "W3":
        return hyperlr.build(hyperlr.FULL, PATHS)
    raise ValueError(f"unknown workload {workload!r} (W1, W2 or W3)")


def python_profile(path: Path, steps: int, top: int) -> str:
    """cProfile over ``steps`` meta-steps: the ``top`` functions by own time."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        path.step()
    profiler.disable()
    stats = pstats.Stats(profiler)
    calls = sum(entry[1] for entry in stats.stats.values())
    total = sum(entry[2] for entry in stats.stats.values())
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    out = io.StringIO()
    out.write(
        f"    {calls / steps:,.0f} Python calls and {1e3 * total / steps:.1f} ms own time "
        "per meta-step (under cProfile)\n"
    )
    shares = _own_time_by_package(stats)
    shown = ", ".join(f"{package} {1e3 * t / steps:.1f}" for package, t in shares.items() if t)
    out.write(f"    own ms per meta-step by package: {shown}\n")
    out.write(f"    {'own ms/step':>11} {'calls/step':>10} {'us/call':>8}  function\n")
    for (filename, line, name), (_, ncalls, tottime, _, _) in rows:
        where = _short(filename)
        out.write(
            f"    {1e3 * tottime / steps:11.2f} {ncalls / steps:10.0f} "
            f"{1e6 * tottime / ncalls:8.2f}  {name} ({where}:{line})\n"
        )
    return out.getvalue()


# Where a Python function's own time is charged, by the first marker in its file name; the
# C++ autograd engine (called as run_backward) and everything else get a line of their own.
PACKAGES = {
    "higher_func": "/higher_func/",
    "higher": "/higher/",
    "torch.nn modules": "/torch/nn/modules/",
}
ENGINE = "<method 'run_backward' of 'torch._C._EngineBase' objects>"


def _own_time_by_package(stats: pstats.Stats) -> Dict[str, float]:
    """Seconds of own time of the functions of each of ``PACKAGES``, of the autograd engine,
    and of the rest."""
    shares = dict.fromkeys([*PACKAGES, "autograd engine", "rest"], 0.0)
    for (filename, _, name), (_, _, tottime, _, _) in stats.stats.items():
        if name == ENGINE:
            shares["autograd engine"] += tottime
            continue
        package = next((p for p, marker in PACKAGES.items() if marker in filename), "rest")
        shares[package] += tottime
    return shares


def op_stats(path: Path, steps: int) -> Tuple[Mapping[str, float], Mapping[str, float]]:
    """Per meta-step: how often each ATen op is called (outermost dispatcher calls only),
    and the CPU milliseconds spent inside each op's own kernels (self time, all levels)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            path.step()
    counts = collections.Counter()
    self_ms = collections.Counter()
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        self_ms[event.name] += event.self_cpu_time_total / 1e3 / steps
        if not _nested_aten(event):
            counts[event.name] += 1
    return {name: count / steps for name, count in counts.items()}, self_ms


def _nested_aten(event) -> bool:
    parent = event.cpu_parent
    return parent is not None and parent.name.startswith("aten::")


def _short(filename: str) -> str:
    for marker in ("site-packages/", "/work/main/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profiling")
    parser.add_argument("--workload", default="W1", choices=["W1", "W2", "W3"])
    parser.add_argument("--steps", type=int, default=10, help="meta-steps profiled per path")
    parser.add_argument("--top", type=int, default=15, help="functions listed per path")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    paths = build(args.workload)
    for path in paths.values():
        path.step()  # warm-up
    stats = {name: op_stats(path, args.steps) for name, path in paths.items()}
    counts = {name: counts for name, (counts, _) in stats.items()}
    for name, path in paths.items():
        begin = time.perf_counter()
        for _ in range(args.steps):
            path.step()
        ms = 1e3 * (time.perf_counter() - begin) / args.steps
        total_ops = sum(counts[name].values())
        print(
            f"\n== {args.workload} {name}: {ms:.1f} ms per meta-step unprofiled, "
            f"{total_ops:,.0f} ATen ops per meta-step"
        )
        print(python_profile(path, args.steps, args.top), end="")
        heaviest = sorted(stats[name][1].items(), key=lambda kv: kv[1], reverse=True)[:8]
        shown = ", ".join(f"{op[6:]} {ms:.1f}" for op, ms in heaviest)
        print(f"    ATen self ms per meta-step (under the profiler): {shown}")
        if name not in BASELINE:
            continue
        reference = counts[BASELINE[name]]
        extra = sorted(
            ((op, n - reference.get(op, 0.0)) for op, n in counts[name].items()),
            key=lambda kv: kv[1],
            reverse=True,
        )
        extra = [(op, n) for op, n in extra if n >= 1][:10]
        if extra:
            shown = ", ".join(f"{op[6:]} +{n:.0f}" for op, n in extra)
            print(f"    ATen ops per meta-step beyond {BASELINE[name]}'s: {shown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
