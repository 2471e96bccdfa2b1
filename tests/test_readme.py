"""Every Python snippet of README.md and of the documentation pages (docs/*.md) runs as written."""

import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

from higher_func import _compat

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_COMPILES = pytest.mark.skipif(
    not _compat.can_trace_autograd(),
    reason=f"higher_func.compile needs torch >= {_compat.MIN_TORCH}, this is {torch.__version__}",
)


def _snippets(page):
    return re.findall(r"```python\n(.*?)```", page.read_text(), re.S)


def _cases():
    for page in PAGES:
        name = page.relative_to(ROOT).as_posix()
        for i, code in enumerate(_snippets(page)):
            # Compiling takes tens of seconds on a CPU: those snippets run with the slow cases.
            marks = [pytest.mark.slow, _COMPILES] if "compile" in code else []
            yield pytest.param(code, id=f"{name}:snippet{i}", marks=marks)


def test_the_readme_has_a_snippet():
    assert _snippets(ROOT / "README.md")


def test_the_docs_have_snippets():
    assert sum(len(_snippets(page)) for page in PAGES) >= 5


@pytest.mark.parametrize("code", list(_cases()))
def test_snippet_runs(code, tmp_path):
    # Run in a scratch directory, importing higher_func from this checkout whether or not it
    # is installed.
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
