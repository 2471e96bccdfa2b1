"""The measured numbers of ``benchmarks/results.json``, as the documentation may state them.

``results.json`` is the one source of every measured number in the docs: ``python -m
benchmarks`` rewrites the entries of the workloads it runs, and the other entries name the
command that measured them. ``facts`` lists every number it holds with its unit, plus the few
numbers the docs derive from them (ratios of two measurements), computed here so that they
change when the measurements do. tests/test_documented_numbers.py checks the pages against it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.json")

#: Units as the docs write them, and their size in the unit a fact is kept in.
TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0}


@dataclass(frozen=True)
class Fact:
    """One measured number: ``value`` in ``unit`` (``x``, ``%``, ``KiB`` or a time unit)."""

    name: str
    value: float
    unit: str


def load(path: str = RESULTS) -> dict:
    with open(path) as f:
        return json.load(f)


def _unit(key: str) -> Optional[str]:
    """The unit of the numbers under ``key``, from its name (``median_ms``, ``run_s``...)."""
    if "speedup" in key:
        return "x"
    if key.endswith("_percent"):
        return "%"
    if key == "bytes" or key.endswith("_bytes"):
        return "bytes"
    if key.startswith("us_") or key.endswith("_us") or "_us_" in key:
        return "us"
    for suffix in ("_ms", "_s"):
        if key.endswith(suffix) or f"{suffix}_" in key:
            return suffix[1:]
    return None


def _leaves(node: Any, name: str, unit: Optional[str]) -> Iterator[Fact]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("source", "config", "machine", "values"):  # settings, provenance
                continue
            yield from _leaves(value, f"{name}.{key}" if name else key, _unit(key) or unit)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _leaves(value, f"{name}[{i}]", unit)
    elif isinstance(node, bool) or not isinstance(node, (int, float)) or unit is None:
        return
    elif unit == "bytes":
        yield Fact(name, node / 1024, "KiB")
    else:
        yield Fact(name, float(node), unit)


def _peak_kib(results: dict, workload: str, label: str) -> float:
    return results["workloads"][workload]["bytes"][label]["peak"] / 1024


def derived(results: dict) -> List[Fact]:
    """The ratios the docs state that no single measurement is (those whose measurements the
    results hold)."""
    facts: List[Fact] = []
    try:
        _ratios(results, facts)
    except KeyError:  # a partial results file (a run of some workloads only)
        pass
    for workload, entry in results["workloads"].items():
        if "run_s" in entry.get("source", {}):
            facts.append(Fact(f"{workload} run", entry["source"]["run_s"], "s"))
    return facts


def _ratios(results: dict, facts: List[Fact]) -> None:
    w = results["workloads"]
    if "M1" in w:
        batched, legacy = _peak_kib(results, "M1", "batched"), _peak_kib(results, "M1", "legacy")
        facts.append(Fact("M1 batched peak / legacy peak", batched / legacy, "x"))
        foreach = results.get("other", {}).get("foreach", {}).get("M1_bytes", {})
        if "legacy" in foreach:
            more = foreach["legacy"]["peak"] / 1024 / legacy - 1
            facts.append(Fact("M1 legacy peak, multi-tensor rules: increase", 100 * more, "%"))
    if "W1" in w:
        ms = w["W1"]["median_ms"]
        facts.append(Fact("W1 batched vs torch.func", ms["torch.func"] / ms["batched"], "x"))
    if "W2" in w:
        ms = w["W2"]["median_ms"]
        slower = ms["batched"] / ms["legacy"] - 1
        facts.append(Fact("W2 batched (a loop) slower than legacy", 100 * slower, "%"))


def facts(results: Optional[dict] = None) -> List[Fact]:
    """Every number of ``results`` (the committed file by default), and the derived ones."""
    results = load() if results is None else results
    found = list(_leaves({"workloads": results["workloads"]}, "", None))
    found += _leaves(results.get("other", {}), "other", None)
    return found + derived(results)


def summary(result_json: Dict[str, Any]) -> Dict[str, Any]:
    """What ``results.json`` keeps of a workload's full JSON: no per-round samples."""
    return {k: v for k, v in result_json.items() if k not in ("seconds", "workload", "paths")}


def settings() -> List[Fact]:
    """Numbers the docs may state that are chosen, not measured: the targets' thresholds and
    the timing method's least block duration (read from the code that uses them)."""
    import inspect
    import re

    from . import targets, timing

    found = []
    for target in targets.TARGETS:
        for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s?(x|us)\b", target.text):
            found.append(Fact(f"target: {target.workload} {target.text}", float(number), unit))
    block = inspect.signature(timing.interleaved).parameters["block_s"].default
    found.append(Fact("timing: least block duration", block, "s"))
    return found
