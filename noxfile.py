"""Developer sessions: `nox -s tests` (the whole suite, slow cases included), `nox -s lint`,
`nox -s doctests`, `nox -s docs`, `nox -s typecheck`, `nox -s bench` and `nox -s compat` (the
suite on every supported Python/torch pair)."""

import os

import nox

PINNED = "2.13.0"  # the torch CI and the default sessions run
TORCH = f"torch=={PINNED}"  # pinned first: an unpinned torch pulls a multi-GB CUDA build
LINTED = ["higher_func", "tests", "benchmarks", "examples", "noxfile.py", "conftest.py"]

nox.options.sessions = ["tests", "lint", "doctests", "typecheck"]

# The support matrix (README, "Supported versions"): the oldest Python with the oldest torch, a
# middle pair, the pinned pair CI runs, and the newest Python with the newest torch release.
COMPAT = [
    ("3.9", "2.0.1"),
    ("3.10", "2.4.1"),
    ("3.11", PINNED),
    ("3.13", "2.15.0"),
]


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


@nox.session(reuse_venv=True)  # each pair's torch brings its CUDA libraries: GBs, minutes
@nox.parametrize(
    "python,torch",
    COMPAT,
    ids=[f"py{py}-torch{torch}" for py, torch in COMPAT],
)
def compat(session, torch):
    """The default suite on one supported (Python, torch) pair; `nox -s compat` runs them all."""
    # The pin is the point of the session: a site-wide pip constraint capping torch (this
    # machine's pip.conf has one) must not veto it. An empty PIP_CONSTRAINT does not clear the
    # configured file; an empty file does.
    no_cap = {"PIP_CONSTRAINT": os.devnull}
    session.install(f"torch=={torch}", env=no_cap)
    session.install("-e", ".[test]", env=no_cap)
    session.run("python", "-m", "pytest", "-p", "no:cacheprovider", *session.posargs)
