"""Every Python snippet of README.md and of the documentation pages (docs/*.md) runs as written."""

import pathlib
import re

import pytest
import torch

import higher_func
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
            yield pytest.param(f"{name}:snippet{i}", code, id=f"{name}:snippet{i}", marks=marks)


def test_the_readme_has_a_snippet():
    assert _snippets(ROOT / "README.md")


def test_the_docs_have_snippets():
    assert sum(len(_snippets(page)) for page in PAGES) >= 5


def _global_state():
    """What a snippet could change for the rest of the process."""
    return {
        "numerics": higher_func.optim.get_numerics(),
        "default dtype": torch.get_default_dtype(),
        "grad mode": torch.is_grad_enabled(),
        "threads": torch.get_num_threads(),
    }


@pytest.mark.parametrize(("where", "code"), list(_cases()))
def test_snippet_runs(where, code, tmp_path, monkeypatch):
    # In this process, in a fresh namespace, as a script (``__name__ == "__main__"``) started
    # in a scratch directory: starting an interpreter per snippet cost more than most
    # snippets take to run.
    monkeypatch.chdir(tmp_path)
    before = _global_state()
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    exec(compile(code, where, "exec"), namespace)  # tracebacks name the page
    assert _global_state() == before, "the snippet changed process-wide state"
