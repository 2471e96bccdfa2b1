"""The repository itself: no large files committed by accident."""

import pathlib
import re
import shlex
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


def _readme_quickstart():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "the README's Quickstart has a sh block with its commands"
    return [line for line in block.group(1).splitlines() if line.strip()], section


def test_ci_runs_the_readme_commands_first_then_the_slow_cases():
    commands, _ = _readme_quickstart()
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    positions = [ci.index(command) for command in commands]  # verbatim, as whole lines
    assert positions == sorted(positions)
    check = re.compile(r"(python -m pytest|ruff|mypy|mkdocs)")
    checks = [i for i, line in enumerate(ci) if check.match(line)]
    assert checks and min(checks) > positions[-1], "the README's commands come before every check"
    assert "python -m pytest -m slow" in ci, "CI runs the slow cases the README leaves out"


def test_pytest_prints_its_summary_and_leaves_the_slow_cases_to_ci():
    options = _pyproject()["tool"]["pytest"]["ini_options"]
    addopts = shlex.split(options["addopts"])
    # `-q` here plus a `-q` on the command line would hide the "N passed" line.
    assert not {"-q", "--quiet"} & set(addopts) and not any(o.startswith("-qq") for o in addopts)
    assert addopts[addopts.index("-m") + 1] == "not slow"


def test_the_cuda_note_comes_before_the_commands_it_warns_about():
    _, section = _readme_quickstart()
    assert section.index("--index-url") < section.index("```sh")


def test_readme_links_work_on_the_package_index():
    # The package index shows README.md without the repository: a relative link breaks there.
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)]+)\)", readme)
    targets += re.findall(r"""(?:href|src)=["']([^"']+)""", readme)
    relative = [t for t in targets if not re.match(r"https?://|#", t)]
    assert not relative, f"relative links in README.md: {relative}"


def test_project_urls_are_addresses_the_project_states():
    urls = _pyproject()["project"]["urls"]
    readme = (ROOT / "README.md").read_text()
    assert urls and all(url.startswith("https://") and url in readme for url in urls.values())
