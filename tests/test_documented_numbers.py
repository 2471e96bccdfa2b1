"""Every measured number the documentation states is one that benchmarks/results.json holds.

The pages (README.md, CONTRIBUTING.md, docs/*.md, benchmarks/README.md and the docstrings of
higher_func) are read for numbers with a unit (``1.48x``, ``67 s``, ``265.6 KiB``, ``8.7%``...)
and for the cells of tables marked ``<!-- measured -->``. Each must equal, at the precision it
is written with, a number of the results file (or one derived from them, or a target's
threshold: ``benchmarks.facts``). A page that rounds differently, keeps a number from an older
run or states a measurement nobody recorded fails here; so does a duration spelled in words,
which cannot be checked.
"""

from __future__ import annotations

import pathlib
import re

import pytest

pytest.importorskip("higher")  # benchmarks.targets builds higher's paths
from benchmarks import facts  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [
    ROOT / "README.md",
    ROOT / "CONTRIBUTING.md",
    ROOT / "benchmarks" / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted((ROOT / "higher_func").glob("*.py")),
]
UNITS = {"x": "x", "%": "%", "KiB": "KiB", "us": "us", "ms": "ms", "s": "s"}
UNITS.update({"seconds": "s", "second": "s", "minutes": "min", "minute": "min", "min": "min"})
# A number and its unit: "1.48x" (no space), "67 s", "8.7 %", "+49%", "40-second".
NUMBER = re.compile(
    r"(?<![\w.\-=/^])[+]?(\d+(?:\.\d+)?)"
    r"(?:(x)|\s?(%|KiB|us|ms|s|min|seconds?|minutes?)|-(second|minute))(?![\w])"
)
# "five minutes", "a minute", "half an hour" (not "a second", which is an ordinal as often).
SPELLED = re.compile(
    r"\b(?:(?:one|two|three|four|five|six|seven|eight|nine|ten|twenty|thirty)"
    r"\s+(?:minutes?|seconds?|hours?)|(?:a|an|half an?)\s+(?:minute|hour))\b",
    re.I,
)
MARKER = "<!-- measured -->"


def _known():
    return facts.facts() + facts.settings()


def _holds(known, value: str, unit: str) -> bool:
    decimals = len(value.split(".")[1]) if "." in value else 0
    tolerance = 0.5 * 10**-decimals + 1e-9
    number = float(value)
    for fact in known:
        if unit in facts.TIME_UNITS and fact.unit in facts.TIME_UNITS:
            held = fact.value * facts.TIME_UNITS[fact.unit] / facts.TIME_UNITS[unit]
        elif unit == fact.unit or unit == "any":
            held = fact.value
        else:
            continue
        if abs(held - number) <= tolerance:
            return True
    return False


def _measured_tables(lines):
    """The line numbers of the body rows of every table after a ``<!-- measured -->`` line."""
    rows, inside = set(), False
    for number, line in enumerate(lines, 1):
        if line.strip() == MARKER:
            inside, header = True, 0
            continue
        if inside and line.startswith("|"):
            header += 1
            if header > 2:  # after the header and the ---- row
                rows.add(number)
        elif inside and line.strip():
            inside = False
    return rows


def _problems(page: pathlib.Path, known) -> list:
    name = page.relative_to(ROOT).as_posix()
    lines = page.read_text().splitlines()
    table_rows = _measured_tables(lines)
    found = []
    for number, line in enumerate(lines, 1):
        where = f"{name}:{number}"
        for spelled in SPELLED.findall(line):
            found.append(f"{where}: '{spelled}' (write a measured duration in digits)")
        if number in table_rows:
            cells = line.strip().strip("|").split("|")[1:]  # the first column names the row
            for cell in cells:
                cell = re.sub(r"\(\d\)", "", cell)  # footnote marks
                for value in re.findall(r"(?<![\w.])\d+(?:\.\d+)?", cell):
                    if not _holds(known, value, "any"):
                        found.append(f"{where}: table cell {value} in {cell.strip()!r}")
            continue
        for match in NUMBER.finditer(line):
            value = match.group(1)
            unit = UNITS[next(u for u in match.groups()[1:] if u)]
            if not _holds(known, value, unit):
                found.append(f"{where}: {match.group(0).strip()!r}")
    return found


def test_the_results_file_says_where_and_when_each_number_was_measured():
    results = facts.load()
    assert results["machine"]["cpu"] and results["machine"]["torch"]
    entries = {**results["workloads"], **results["other"]}
    for name, entry in entries.items():
        source = entry["source"]
        assert source["command"] and re.fullmatch(r"\d{4}-\d\d-\d\d", source["date"]), name


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_measured_number_of_the_page_is_in_the_results_file(page):
    problems = _problems(page, _known())
    assert not problems, (
        "numbers that benchmarks/results.json does not hold (re-measure and record them there, "
        "or state what it holds):\n" + "\n".join(problems)
    )


def test_the_check_catches_a_number_nobody_measured(tmp_path):
    known = _known()
    assert _holds(known, "1.48", "x") and _holds(known, "11.2", "x") and _holds(known, "67", "s")
    assert not _holds(known, "1.52", "x") and not _holds(known, "40", "s")
    page = ROOT / "docs" / "_probe.md"
    lines = ["W1 compiles in about 40 s, legacy runs 1.52x; the suite takes five minutes.", ""]
    lines += [MARKER, "| path | ms |", "| --- | --- |", "| legacy | 249.66 |", "| batched | 31.0 |"]
    try:
        page.write_text("\n".join(lines))
        problems = _problems(page, known)
    finally:
        page.unlink()
    assert [p.split(": ", 1)[1] for p in problems] == [
        "'five minutes' (write a measured duration in digits)",
        "'40 s'",
        "'1.52x'",
        "table cell 31.0 in '31.0'",
    ]


def test_only_a_full_run_into_the_default_directory_records_into_the_committed_file(tmp_path):
    from benchmarks.__main__ import parse, summary_file

    assert summary_file(parse([])) == facts.RESULTS
    assert summary_file(parse(["--workload", "W1"])) == facts.RESULTS
    for argv in (["--quick"], ["--quick", "--output", str(tmp_path)], ["--output", str(tmp_path)]):
        assert pathlib.Path(summary_file(parse(argv))).resolve() != pathlib.Path(facts.RESULTS)
    assert summary_file(parse(["--output", str(tmp_path)])) == str(tmp_path / "results.json")
