"""The code blocks of README.md and docs/*.md work as written.

Each fenced ```python block runs alone in a fresh Python from an empty temporary directory
(PYTHONPATH leads to the bncpu under test, see conftest.py); one that imports mpi4py runs
on 2 processes under mpiexec. Each ```c block compiles against bncpu.h, and one with a
main() is linked and run. Shell blocks are what a reader types (installs, builds, the
speed report) and are not run, except those marked ``<!-- run -->``: their lines run
from the repository root. Python and C blocks marked ``<!-- fragment -->`` are excerpts
and are not run. docs/testing.md describes the markers. Every run is bounded in time: a
block that hangs fails instead of hanging the suite.

Relative links between these pages must lead to a file, and to a heading when they name
one.
"""
import importlib.util
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

from test_c_api import compile_c, example_env, toolchain  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKERS = {"<!-- fragment -->": {"python", "c"}, "<!-- run -->": {"bash", "sh"}}
TIMEOUT = 300
# Blocks that need an optional package are skipped where it is missing.
OPTIONAL_IMPORTS = {"torch": "torch", "mpi4py": "mpi4py", "sklearn": "scikit-learn"}
README_WORDS = 2000


class Block(NamedTuple):
    page: Path
    line: int          # of the opening fence, 1-based
    language: str
    marker: str        # the marker comment on the line before the fence, or ""
    source: str

    def __str__(self):
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks_of(page):
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, start = [], None
    for number, line in enumerate(lines):
        if start is None:
            opening = re.fullmatch(r"```(\S*)\s*", line)
            if opening:
                start, language = number, opening.group(1).lower()
        elif re.fullmatch(r"```\s*", line):
            marker = lines[start - 1].strip() if start > 0 else ""
            blocks.append(Block(page, start + 1, language,
                                marker if marker in MARKERS else "",
                                "\n".join(lines[start + 1:number]) + "\n"))
            start = None
    assert start is None, f"{page.relative_to(ROOT)}:{start + 1}: the block is never closed"
    return blocks


BLOCKS = [block for page in PAGES for block in blocks_of(page)]


def blocks(*languages):
    chosen = [b for b in BLOCKS if b.language in languages and b.marker != "<!-- fragment -->"]
    return pytest.mark.parametrize("block", chosen, ids=str)


def skip_unless_importable(source):
    """Skip when the code imports an optional package that is not installed."""
    for module, package in OPTIONAL_IMPORTS.items():
        if (re.search(rf"^\s*(import|from)\s+{module}\b", source, re.MULTILINE)
                and importlib.util.find_spec(module) is None):
            pytest.skip(f"{package} is not installed")


def run_bounded(command, cwd, env=None):
    """Run ``command`` in its own process group; kill the group past TIMEOUT. Returns
    (exit status, stdout and stderr)."""
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output = process.communicate(timeout=TIMEOUT)[0]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"{command} did not finish within {TIMEOUT} s")
    return process.returncode, output


def find_mpiexec():
    """The mpiexec beside this Python (a virtual environment's pip mpich) or on PATH, as
    a command that runs 2 processes (Open MPI refuses more ranks than cores, and root,
    unless told); skip where mpi4py or mpiexec is missing."""
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (the mpi extra)")
    from test_distributed_mpi import find_tool
    path = find_tool("mpiexec")
    if path is None:
        pytest.skip("mpiexec not found (the mpi extra installs MPICH's)")
    version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
    if "Open MPI" in version.stdout + version.stderr:
        return [path, "--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    return [path]


def shell_env():
    """This Python (and the mpiexec beside it) first on PATH."""
    return dict(os.environ, PATH=os.pathsep.join([os.path.dirname(sys.executable),
                                                  os.environ.get("PATH", "")]))


# ----------------------------------------------------------------------------------
# The blocks
# ----------------------------------------------------------------------------------
@blocks("python")
def test_python_block(block, tmp_path):
    skip_unless_importable(block.source)
    script = tmp_path / "block.py"
    script.write_text(block.source, encoding="utf-8")
    command = [sys.executable, str(script)]
    if re.search(r"^\s*(import|from)\s+mpi4py\b", block.source, re.MULTILINE):
        command = [*find_mpiexec(), "-n", "2", *command]
    status, output = run_bounded(command, cwd=tmp_path)
    assert status == 0, f"{block} failed (exit status {status}):\n{output[-3000:]}"


@blocks("c")
def test_c_block(block, toolchain, tmp_path):  # noqa: F811 (the fixture)
    compiler, include_flags, link_flags = toolchain
    source = tmp_path / "block.c"
    source.write_text(block.source, encoding="utf-8")
    if not re.search(r"\bmain\s*\(", block.source):
        compile_c(compiler + ["-c", "-Wall", "-Wextra", "-Werror", str(source),
                              "-o", str(tmp_path / "block.o")] + include_flags)
        return
    binary = tmp_path / "block"
    compile_c(compiler + ["-O2", "-Wall", "-Wextra", "-Werror", str(source), "-o", str(binary)]
              + include_flags + link_flags)
    status, output = run_bounded([str(binary)], cwd=tmp_path, env=example_env())
    assert status == 0, f"{block} failed (exit status {status}):\n{output[-3000:]}"


COMMANDS = [(block, line) for block in BLOCKS if block.marker == "<!-- run -->"
            for line in block.source.splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("block,command", COMMANDS,
                         ids=[f"{block}:{command}" for block, command in COMMANDS])
def test_marked_command(block, command):
    if command.startswith("mpiexec"):
        find_mpiexec()
    for script in re.findall(r"\S+\.py\b", command):
        skip_unless_importable((ROOT / script).read_text(encoding="utf-8"))
    status, output = run_bounded(["bash", "-c", command], cwd=ROOT, env=shell_env())
    assert status == 0, f"{block}: `{command}` failed (exit status {status}):\n{output[-3000:]}"


# ----------------------------------------------------------------------------------
# The pages
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_markers_precede_a_block_they_apply_to(page):
    """A marker stands alone right before the fence of a block of its kinds: a misspelt
    or misplaced one would silently run (or not run) a block."""
    lines = page.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not re.fullmatch(r"<!--\s*[\w-]+\s*-->", line.strip()):
            continue
        assert line.strip() in MARKERS, f"{page.name}:{number}: unknown marker {line!r}"
        following = next((b for b in BLOCKS if b.page == page and b.line == number + 1), None)
        assert following is not None, f"{page.name}:{number}: no block follows the marker"
        assert following.language in MARKERS[line.strip()], (
            f"{page.name}:{number}: {line.strip()} does not apply to a "
            f"{following.language or 'plain'} block")


def heading_anchors(page):
    """GitHub's anchors of the page's headings (lower case, punctuation dropped, spaces
    to hyphens; a repeated anchor gets -1, -2, ...)."""
    anchors, seen, in_block = set(), {}, False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_block = not in_block
        heading = None if in_block else re.match(r"#{1,6}\s+(.*?)\s*$", line)
        if heading:
            anchor = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
            anchors.add(f"{anchor}-{seen[anchor]}" if anchor in seen else anchor)
            seen[anchor] = seen.get(anchor, 0) + 1
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_relative_links_resolve(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: the link {target} leads to no file"
        if anchor and linked.suffix == ".md":
            assert anchor in heading_anchors(linked), (
                f"{page.name}: the link {target}: {linked.name} has no heading #{anchor}")


def test_readme_is_a_short_page():
    """The README is a newcomer's page; the long material lives in docs/."""
    words = len((ROOT / "README.md").read_text(encoding="utf-8").split())
    assert words <= README_WORDS, f"README.md has {words} words (at most {README_WORDS})"


def test_readme_runs_the_tests_as_ci_does():
    """The README's test command is the one .ci/run runs on a fresh clone (CI adds -q)."""
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    command = ci[ci.index("# The README's test command:") + 1].replace(" -q", "")
    readme_commands = [line for b in BLOCKS if b.page.name == "README.md"
                       and b.language in ("bash", "sh") for line in b.source.splitlines()]
    assert any(line.endswith(command) for line in readme_commands), (
        f"no README command ends with .ci/run's {command!r}")
