"""Every Python snippet of the README runs as written."""

import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def _cases():
    for i, code in enumerate(SNIPPETS):
        # Compiling takes tens of seconds on a CPU: those snippets run with the slow cases.
        marks = [pytest.mark.slow] if "compile" in code else []
        yield pytest.param(code, id=f"snippet{i}", marks=marks)


def test_the_readme_has_snippets():
    assert len(SNIPPETS) >= 3


@pytest.mark.parametrize("code", list(_cases()))
def test_snippet_runs(code):
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
