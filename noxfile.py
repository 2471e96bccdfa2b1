"""Developer sessions: `nox -s tests` (the whole suite, slow cases included) and `nox -s lint`."""

import nox

TORCH = "torch==2.13.0"  # pinned first: an unpinned torch pulls a multi-GB CUDA build

nox.options.sessions = ["tests", "lint"]


@nox.session
def tests(session):
    session.install(TORCH)
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", "-m", "", *session.posargs)


@nox.session
def lint(session):
    session.install("ruff")
    session.run("ruff", "check", "higher_func", "tests", "benchmarks", "examples", "noxfile.py")
    session.run("ruff", "format", "--check", "higher_func", "tests", "benchmarks", "examples")


@nox.session
def bench(session):
    session.install(TORCH)
    session.install("-e", ".[test,examples]")  # matplotlib draws the scaling plot
    session.run("python", "-m", "benchmarks", *session.posargs)
