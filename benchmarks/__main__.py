"""``python -m benchmarks``: run the workloads side by side, print the ratios and targets,
write ``benchmarks/results/*.json`` and ``benchmarks/results/scaling.png``, and record what
was measured in ``benchmarks/results.json`` (the committed source of the docs' numbers) when
the run is full-size and writes into the default directory; any other run writes its own
``results.json`` into its results directory.

Examples:
    python -m benchmarks                  # everything at full size (1620 s here)
    python -m benchmarks --quick          # smallest sizes, 3 rounds: a smoke run
    python -m benchmarks --workload W1 --workload M1
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

from . import facts, plot, report, scaling
from .entry import EntryResult
from .memory import MemoryResult
from .targets import evaluate
from .workloads import WORKLOADS, Settings

SCALING = "scaling"
DESCRIPTION = (
    "Time higher, higher_func (legacy, batched, compiled) and hand-written torch.func on the "
    "same meta-steps; print the ratios and targets; write JSON and a scaling plot."
)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parse(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=DESCRIPTION)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smallest sizes and 3 rounds (results go to results/quick/); targets are only "
        "meaningful at full size",
    )
    parser.add_argument(
        "--workload",
        action="append",
        choices=[*WORKLOADS, SCALING],
        help="run only this workload (repeatable): "
        + ", ".join(f"{w.id} ({w.title})" for w in WORKLOADS.values())
        + f", {SCALING} (W1 against tasks and inner steps); default: all of them",
    )
    parser.add_argument(
        "--rounds", type=int, help="timed rounds per workload (default: per workload)"
    )
    parser.add_argument("--output", default=None, help=f"results directory (default {RESULTS})")
    return parser.parse_args(argv)


def output_directory(args) -> str:
    return args.output or (os.path.join(RESULTS, "quick") if args.quick else RESULTS)


def summary_file(args) -> str:
    """Where the run records what it measured: the committed ``benchmarks/results.json``
    only for a full-size run into the default directory (the docs' numbers come from it);
    any other run writes ``results.json`` into its own results directory."""
    if args.output is None and not args.quick:
        return facts.RESULTS
    return os.path.join(output_directory(args), "results.json")


def main(argv=None) -> int:
    args = parse(argv)
    begin = time.perf_counter()
    # One thread: two cores shared with other work; and a per-path comparison of Python
    # overhead should not depend on how many threads an op happens to get.
    torch.set_num_threads(1)
    # Compile times are cold ones, what a user's first run sees, unless the caller points
    # Inductor at a cache of their own.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="bench-inductor-"))
    output = output_directory(args)
    summary_path = summary_file(args)
    settings = Settings(quick=args.quick, rounds=args.rounds)
    selected = args.workload or [*WORKLOADS, SCALING]
    info = report.machine()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - begin:6.1f}s] {message}", file=sys.stderr, flush=True)

    print(
        f"{info['cpu']}, {info['cores']} cores, torch {info['torch']} "
        f"({info['torch_threads']} thread), higher {info['higher']}, python {info['python']}, "
        f"checkout {info['git']}" + (" -- QUICK sizes" if args.quick else "")
    )
    results = {}
    for workload in selected:
        started = time.perf_counter()
        if workload == SCALING:
            sweeps = run_scaling(settings, output, info, log)
            report.record(summary_path, SCALING, {"sweeps": sweeps}, info, started)
            continue
        missing = WORKLOADS[workload].missing()
        if missing:
            print(f"\n{workload}: skipped: {missing}")
            continue
        result = WORKLOADS[workload].run(settings, log)
        results[workload] = result
        if isinstance(result, MemoryResult):
            print("\n" + report.memory_table(result))
        elif isinstance(result, EntryResult):
            print("\n" + result.table())
        else:
            print("\n" + report.timing_table(result))
        report.write_json(output, workload, result.to_json(), info)
        report.record(summary_path, workload, facts.summary(result.to_json()), info, started)
    rows = evaluate(results)
    if rows:
        print("\n" + report.targets_table(rows))
        if args.quick:
            print("  (quick sizes: the targets are stated for the full sizes)")
        summary = [dict(zip(("workload", "target", "measured", "verdict"), r)) for r in rows]
        report.write_json(output, "targets", {"targets": summary, "quick": args.quick}, info)
    print(f"\nfinished in {time.perf_counter() - begin:.0f} s; results in {output}")
    print(f"measured numbers recorded in {summary_path}")
    return 0


def run_scaling(settings: Settings, output: str, info: dict, log) -> list:
    rounds = settings.rounds or (1 if settings.quick else 3)
    tasks = scaling.QUICK_TASKS if settings.quick else scaling.TASKS
    steps = scaling.QUICK_STEPS if settings.quick else scaling.STEPS
    log(f"scaling: tasks {tasks}, {rounds} round(s) per point")
    sweeps = [scaling.sweep("tasks", tasks, rounds, log)]
    log(f"scaling: inner steps {steps}")
    sweeps.append(scaling.sweep("steps", steps, rounds, log))
    report.write_json(output, "scaling", {"sweeps": sweeps}, info)
    title = f"{info['cpu']}, 1 thread, torch {info['torch']}, higher {info['higher']}"
    png = plot.scaling(sweeps, os.path.join(output, "scaling.png"), title)
    if png is None:
        print("\nno scaling plot: matplotlib is missing (pip install -e '.[examples]')")
    else:
        print(f"\nscaling plot: {png}")
    for sweep in sweeps:
        names = list(sweep["median_ms"])
        print(f"  {sweep['axis']:>5}: " + " ".join(f"{n:>20}" for n in names))
        for i, value in enumerate(sweep["values"]):
            row = " ".join(f"{sweep['median_ms'][n][i]:20.1f}" for n in names)
            print(f"  {value:>5}: {row}")
    return sweeps


if __name__ == "__main__":
    sys.exit(main())
