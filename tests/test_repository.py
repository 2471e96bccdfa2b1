"""The repository itself: no large files committed by accident."""

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
LIMIT = 1_000_000  # bytes; a wheel, a dataset or a results dump is far bigger


def _tracked_files():
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    done = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:  # an sdist or a copy without its .git
        pytest.skip(f"not a git checkout: {done.stderr.strip()}")
    return [ROOT / name for name in done.stdout.split("\0") if name]


def test_no_tracked_file_is_over_1_mb():
    sizes = {
        p.relative_to(ROOT).as_posix(): p.stat().st_size for p in _tracked_files() if p.is_file()
    }
    too_big = {name: size for name, size in sizes.items() if size > LIMIT}
    assert not too_big, f"tracked files over {LIMIT} bytes (keep them out of git): {too_big}"


def _pyproject():
    # The standard library reads TOML from Python 3.11 on; the matrix runs these there.
    tomllib = pytest.importorskip("tomllib", reason="tomllib is new in Python 3.11")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_version_has_one_source():
    import higher_func

    config = _pyproject()
    assert "version" not in config["project"] and "version" in config["project"]["dynamic"]
    assert config["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "higher_func.__version__"}
    assert isinstance(higher_func.__version__, str) and higher_func.__version__


def test_what_ships_with_the_package():
    config = _pyproject()
    assert config["project"]["license"] == "Apache-2.0"
    for name in config["project"]["license-files"]:
        assert (ROOT / name).is_file()
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["higher_func"]
    assert (ROOT / "higher_func" / "py.typed").is_file()
