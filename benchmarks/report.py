"""Results of a timed workload, the tables printed for them, and the JSON written for them."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from .memory import MemoryResult
from .paths import DESCRIPTIONS, FUNC, FUNC_AUTOGRAD, HIGHER, FirstCall, ordered
from .timing import Samples


@dataclass
class TimingResult:
    """A timed workload: every path's per-round seconds and what its first call showed.

    Attributes:
        workload, title, config: what was measured.
        samples: the interleaved timings of every path that ran (wrong ones too, flagged).
        first: every path's first call (duration, meta-gradient error vs ``reference``).
        tolerance: the largest relative meta-gradient error counted as the same math.
    """

    workload: str
    title: str
    config: dict
    samples: Samples
    first: FirstCall
    tolerance: float
    reference: str = HIGHER

    def timed(self) -> List[str]:
        return ordered(self.samples.seconds)

    def wrong(self) -> List[str]:
        return self.first.wrong(self.tolerance)

    def best_func(self) -> Optional[str]:
        """The faster of the hand-written torch.func paths that computed the right answer."""
        candidates = [
            n for n in (FUNC, FUNC_AUTOGRAD) if n in self.samples.seconds and n not in self.wrong()
        ]
        if not candidates:
            return None
        return min(candidates, key=self.samples.median)

    def to_json(self) -> dict:
        return {
            "workload": self.workload,
            "title": self.title,
            "config": self.config,
            "paths": {n: DESCRIPTIONS[n] for n in ordered(self.first.seconds)},
            "median_ms": {n: 1e3 * self.samples.median(n) for n in self.timed()},
            "speedup_vs_higher": {
                n: self.samples.speedup(n, HIGHER) for n in self.timed() if HIGHER in self.timed()
            },
            "seconds": self.samples.seconds,
            "first_call_s": self.first.seconds,
            "meta_gradient_error_vs_" + self.reference: self.first.error,
            "tolerance": self.tolerance,
            "wrong": self.wrong(),
            "failed": self.first.failed,
        }


def timing_table(result: TimingResult) -> str:
    """The rows of one timed workload: median, speedup vs higher, first call, gradient check."""
    lines = [
        f"{result.workload}: {result.title}",
        f"  {'path':<20} {'median ms':>10} {'vs higher':>10} {'1st call s':>11}  meta-grad err",
    ]
    base = HIGHER in result.samples.seconds
    for name in ordered(list(result.first.seconds) + list(result.first.failed)):
        if name in result.first.failed:
            lines.append(f"  {name:<20} {'failed':>10}  {result.first.failed[name]}")
            continue
        error = result.first.error[name]
        flag = "  WRONG (excluded from targets)" if name in result.wrong() else ""
        median = f"{1e3 * result.samples.median(name):10.2f}"
        speedup = f"{result.samples.speedup(name, HIGHER):9.2f}x" if base else f"{'':>10}"
        first = f"{result.first.seconds[name]:11.2f}"
        lines.append(f"  {name:<20} {median} {speedup} {first}  {error:.1e}{flag}")
    return "\n".join(lines)


def memory_table(result: MemoryResult) -> str:
    """The rows of one memory workload, in KiB."""
    lines = [
        f"{result.workload}: {result.title}",
        f"  {'path':<26} {'peak KiB':>10} {'retained':>10} {'peak, no GC':>12} "
        f"{'retained, no GC':>16}",
    ]
    for label, b in result.bytes.items():
        lines.append(
            f"  {label:<26} {b['peak'] / 1024:10.1f} {b['retained'] / 1024:10.1f} "
            f"{b['peak_no_gc'] / 1024:12.1f} {b['retained_no_gc'] / 1024:16.1f}"
        )
    return "\n".join(lines)


def machine() -> dict:
    """What the numbers were measured on."""
    import higher

    model = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(
            line.split(":", 1)[1].strip()
            for line in lscpu.splitlines()
            if line.startswith("Model name")
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "higher": getattr(higher, "__version__", _distribution_version("higher")),
        "higher_func": _distribution_version("higher-func"),
        "platform": platform.platform(),
        "git": _git_revision(),
        "argv": sys.argv,
    }


def _git_revision() -> Optional[str]:
    """The checkout's commit, ``-dirty`` when the working tree differs from it."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        return subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _distribution_version(name: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def write_json(directory: str, name: str, payload: dict, info: dict) -> str:
    """Write ``payload`` (with the machine ``info``) to ``directory/name.json``."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{name}.json")
    with open(path, "w") as f:
        json.dump({"machine": info, **payload}, f, indent=1)
    return path


def record(path: str, workload: str, summary: dict, info: dict, started: float) -> None:
    """Put ``workload``'s ``summary`` into the results file at ``path`` (created if missing),
    with where, when and by what command it was measured; other entries stay as they are."""
    import datetime
    import time

    try:
        with open(path) as f:
            results = json.load(f)
    except FileNotFoundError:
        results = {"machine": {}, "workloads": {}, "other": {}}
    source = {
        "command": " ".join(["python -m benchmarks", *info["argv"][1:]]),
        "commit": info["git"],
        "date": datetime.date.today().isoformat(),
        "run_s": round(time.perf_counter() - started, 1),
    }
    keys = ("cpu", "cores", "torch_threads", "python", "torch", "higher")
    source["machine"] = results["machine"] = {k: info[k] for k in keys}
    results["workloads"][workload] = {"source": source, **summary}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")


def targets_table(rows: Sequence[tuple]) -> str:
    """``rows`` of ``(workload, target, measured, verdict)``."""
    lines = ["targets"]
    for workload, text, measured, verdict in rows:
        lines.append(f"  {verdict:<5} {workload:<3} {text:<58} {measured}")
    return "\n".join(lines)
