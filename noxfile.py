"""Developer sessions: `nox -s tests` (the whole suite, slow cases included), `nox -s lint`,
`nox -s doctests`, `nox -s docs`, `nox -s typecheck` and `nox -s bench`."""

import nox

TORCH = "torch==2.13.0"  # pinned first: an unpinned torch pulls a multi-GB CUDA build
LINTED = ["higher_func", "tests", "benchmarks", "examples", "noxfile.py", "conftest.py"]

nox.options.sessions = ["tests", "lint", "doctests", "typecheck"]


@nox.session
def tests(session):
    session.install(TORCH)
    session.install("-e", ".[test,examples]")  # the examples' tests skip without their extra
    session.run("python", "-m", "pytest", "-m", "", *session.posargs)


@nox.session
def lint(session):
    session.install("ruff")
    session.run("ruff", "check", *LINTED)
    session.run("ruff", "format", "--check", *LINTED)


@nox.session
def doctests(session):
    """Every example in the docstrings runs (the conftest.py at the root supplies imports)."""
    session.install(TORCH)
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", "--doctest-modules", "higher_func", *session.posargs)


@nox.session
def docs(session):
    """The documentation site into site/; any warning (a broken link, a missing name) fails."""
    session.install(TORCH)
    session.install("-e", ".[docs]")
    session.run("mkdocs", "build", "--strict", *session.posargs)


@nox.session
def typecheck(session):
    """mypy over higher_func, configured in pyproject.toml."""
    session.install(TORCH)
    session.install("-e", ".", "mypy")
    session.run("mypy", *session.posargs)


@nox.session
def bench(session):
    session.install(TORCH)
    session.install("-e", ".[test,examples]")  # matplotlib draws the scaling plot
    session.run("python", "-m", "benchmarks", *session.posargs)
