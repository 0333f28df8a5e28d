"""Every code block of the README, experiments/README.md and docs/ runs, so the documentation cannot rot.

- ```python blocks run, in order, in one namespace per page, in a fresh empty folder;
- ```shell blocks: every `jaxcascade ...` command (continuation lines joined, environment assignments and
  a trailing `&` dropped) must parse with the real `cli.build_parser()`, options, choices and all; and each
  block runs as written, in bash, in order, in one fresh empty folder per page, on the files that earlier
  blocks of the page wrote (the README's and the docs pages' below), unless the comment before it marks it
  a template (`<!-- template: ... -->` in the README, `% template: ...` in a docs page) and names the
  placeholders that the reader replaces with their own files;
- ```console blocks are not run (installs, GPUs, long runs): each must be preceded by a comment saying why
  (`<!-- not run by ...: why -->` in the README, `% not run by ...: why` in a docs page);
- ```text and ```bibtex blocks are output and data, not code.
Any other language, an unlabelled fence or an indented code block fails, so nothing escapes the rules.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jaxcascade import cli

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", REPO / "experiments" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUN, PARSE, SKIP, DATA = "python", "shell", "console", ("text", "bibtex")
NOT_RUN = re.compile(r"^(<!--|%)\s*not run by [^:]+: \S")
TEMPLATE = re.compile(r"^(?:<!--|%)\s*template:\s*(\S.*)")


def code_blocks(path: Path) -> list[tuple[str, str, str, int]]:
    """(language, code, the nonblank line before the fence, line number) of each fenced block."""
    blocks, lines, index = [], path.read_text().splitlines(), 0
    while index < len(lines):
        fence = re.match(r"^(```+)\s*(\S*)", lines[index])
        if fence and fence.group(2).startswith("{"):  # a MyST directive (toctree, eval-rst): not code
            index = next(i for i in range(index + 1, len(lines)) if lines[i].startswith(fence.group(1)))
        elif fence:
            before = next((line for line in reversed(lines[:index]) if line.strip()), "")
            # a multi-line comment: the reason sits on its first line
            for back in range(index - 1, -1, -1):
                if not lines[back].startswith("%"):
                    break
                before = lines[back]
            end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith(fence.group(1)))
            blocks.append((fence.group(2), "\n".join(lines[index + 1:end]), before, index + 1))
            index = end
        index += 1
    return blocks


def commands(shell: str) -> list[list[str]]:
    """The `jaxcascade` commands of a shell block, as argv lists without the program name."""
    found = []
    for line in shell.replace("\\\n", " ").splitlines():
        for part in re.split(r"&&|;|(?<![&])&(?!&)", line.split(" #", 1)[0]):
            words = shlex.split(part)
            while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
                words.pop(0)
            if words and words[0] == "jaxcascade":
                found.append(words[1:])
    return found


def check_parses(argv: list[str]) -> None:
    parser = cli.build_parser()
    args, unknown = parser.parse_known_args(argv)
    assert not unknown or getattr(args, "overrides", False), f"unrecognised: {unknown}"
    for override in unknown:  # train's --config.a.b=value overrides
        assert re.match(r"^--config(\.\w+)+=", override), override


ALL_BLOCKS = [(page, *block) for page in PAGES for block in code_blocks(page)]


def _id(item) -> str:
    return f"{item[0].relative_to(REPO)}:{item[4]}"


@pytest.mark.parametrize("item", ALL_BLOCKS, ids=_id)
def test_every_block_has_a_known_language_and_skips_say_why(item):
    page, language, _code, before, _line = item
    assert language in (RUN, PARSE, SKIP, *DATA), f"{language!r}: use python, shell, console (with a reason) or text"
    if language == SKIP:
        assert NOT_RUN.match(before), "a console block is not run: say why in the comment before it"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_no_indented_code_blocks(page):
    """Indented code would escape the checks above; every block is fenced."""
    lines, in_fence = page.read_text().splitlines(), False
    for number, line in enumerate(lines, 1):
        if line.startswith("```"):
            in_fence = not in_fence
        elif not in_fence and line.startswith("    ") and line.strip():
            assert number > 1 and lines[number - 2].strip(), f"{page.name}:{number}: an indented code block; fence it"


SHELL_COMMANDS = [(page, line, argv) for page, language, code, _before, line in ALL_BLOCKS if language == PARSE
                  for argv in commands(code)]


@pytest.mark.parametrize("item", SHELL_COMMANDS, ids=lambda item: f"{item[0].relative_to(REPO)}:{item[1]}:{item[2][0]}")
def test_shell_commands_parse(item):
    check_parses(item[2])


def test_the_shell_checker_catches_mistakes():
    with pytest.raises(Exception):
        check_parses(["segment", "--model", "m", "--infrence", "dense"])
    with pytest.raises(Exception):
        check_parses(["phantom", "out", "--size", "huge"])
    assert commands("A=1 B=2 \\\n  jaxcascade demo &\njaxcascade demo --workdir w && ls") == [["demo"], ["demo", "--workdir", "w"]]


def test_every_command_and_option_is_documented():
    """docs/cli.md names every command and every option of `jaxcascade`'s parser."""
    page = (REPO / "docs" / "cli.md").read_text()
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in subparsers.choices.items():
        assert f"## `jaxcascade {name}`" in page, f"docs/cli.md has no section for `jaxcascade {name}`"
        for action in command._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert option in page, f"docs/cli.md does not mention `jaxcascade {name} {option}`"


# The README's one block runs in the test after this one, which checks what it writes.
PYTHON_PAGES = sorted({page for page, language, *_ in ALL_BLOCKS if language == RUN} - {REPO / "README.md"}, key=str)


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"docs_{page.stem}"}
    for language, code, _before, line in code_blocks(page):
        if language == RUN:
            exec(compile(code, f"{page.relative_to(REPO)}:{line}", "exec"), namespace)


def test_readme_python_api_snippet_writes_what_it_says(tmp_path, monkeypatch):
    """The README's API snippet trains, segments, scores and reports for real."""
    monkeypatch.chdir(tmp_path)
    code = next(code for language, code, *_ in code_blocks(REPO / "README.md") if language == RUN)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "seg.nii.gz").is_file() and (tmp_path / "new-seg" / "lesions.csv").is_file()
    assert namespace["rows"][0]["status"] == "ok" and namespace["result"].mask.any()
    assert os.path.isdir(tmp_path / "runs" / "a" / "weights")


def runnable_shell_blocks(page: Path) -> list[tuple[str, int]]:
    """(code, line number) of a page's shell blocks that are not marked as templates."""
    return [(code, line) for language, code, before, line in code_blocks(page)
            if language == PARSE and not TEMPLATE.match(before)]


def run_shell_blocks(page: Path, folder: Path, *, timeout: float = 900) -> list[str]:
    """Runs a page's runnable shell blocks in order in folder, each in bash as written; returns their output.

    The `jaxcascade` on PATH is this interpreter's; background jobs (`&`) are waited for and must succeed too.
    """
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    printed = []
    for code, line in runnable_shell_blocks(page):
        script = f"set -euo pipefail\n{code}\nfor job in $(jobs -p); do wait \"$job\"; done\n"
        done = subprocess.run(["bash", "-c", script], cwd=folder, env=env, capture_output=True, text=True,
                              timeout=timeout)
        assert done.returncode == 0, (f"{page.relative_to(REPO)}:{line} exits {done.returncode} when run as "
                                      f"written:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        printed.append(done.stdout)
    return printed


TEMPLATES = [item for item in ALL_BLOCKS if TEMPLATE.match(item[3])]


@pytest.mark.parametrize("item", TEMPLATES, ids=_id)
def test_templates_name_their_placeholders(item):
    """A template says which of its words are the reader's own files or folders (in backticks), each in it."""
    page, language, code, before, _line = item
    assert language == PARSE, "only shell blocks are templates; other code runs or says why not"
    placeholders = re.findall(r"`([^`]+)`", TEMPLATE.match(before).group(1))
    assert placeholders, "name the placeholders in backticks: <!-- template: `T1.nii.gz`, `FLAIR.nii.gz`: your images -->"
    for placeholder in placeholders:
        assert placeholder in code, f"{placeholder!r} is not in the block"


def test_the_template_marker_is_read():
    assert TEMPLATE.match("<!-- template: `T1.nii.gz`: yours -->") and not TEMPLATE.match("<!-- not run by x: y -->")
    assert TEMPLATE.match("% template: `MODEL`: a model directory").group(1) == "`MODEL`: a model directory"
    assert not TEMPLATE.match("% template:")


# Pages whose blocks take minutes: the demo trains 12 + 12 epochs, distributed.md trains in two processes.
SLOW_PAGES = {REPO / "README.md", REPO / "docs" / "cli.md", REPO / "docs" / "studies.md",
              REPO / "docs" / "distributed.md"}


def runs_the_demo(page: Path) -> bool:
    return any(re.search(r"^jaxcascade demo\b", code, re.M) for code, _line in runnable_shell_blocks(page))


def _marks(page: Path) -> list:
    return ([pytest.mark.slow] if page in SLOW_PAGES else []) + \
        ([pytest.mark.needs_finished_demo] if runs_the_demo(page) else [])


SHELL_PAGES = [pytest.param(page, id=str(page.relative_to(REPO)), marks=_marks(page))
               for page in PAGES if runnable_shell_blocks(page) and page.name != "README.md"]


@pytest.fixture(scope="session")
def finished_demo(demo_in_background) -> Path:
    """`jaxcascade demo` run once, as the README says, from an empty folder: the process conftest's
    demo_in_background started when the session began (so that its minutes overlap the in-process tests on
    a second core), waited for here."""
    from conftest import wait_for

    process, logs, folder = demo_in_background
    done = wait_for(process, logs, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return folder / "jaxcascade-demo"


def _with_finished_demo(page: Path, folder: Path, request) -> None:
    """A page that runs `jaxcascade demo` finds the finished demo in its folder: the command then resumes and
    finds both stages trained (seconds), so the suite trains the demo once (`finished_demo`), not per page."""
    if runs_the_demo(page):
        shutil.copytree(request.getfixturevalue("finished_demo"), folder / "jaxcascade-demo")


@pytest.mark.parametrize("page", SHELL_PAGES)
def test_docs_shell_blocks_run_as_written(page, tmp_path, request):
    _with_finished_demo(page, tmp_path, request)
    run_shell_blocks(page, tmp_path)


@pytest.mark.slow
@pytest.mark.needs_finished_demo
def test_readme_shell_blocks_run_as_written(tmp_path, request):
    """Every README command not marked as a template runs as written and writes what the README says (the
    demo from an empty folder in `finished_demo`, then resumed here)."""
    _with_finished_demo(REPO / "README.md", tmp_path, request)
    printed = "\n".join(run_shell_blocks(REPO / "README.md", tmp_path))
    demo = tmp_path / "jaxcascade-demo"
    assert json.loads((demo / "held_out_metrics.json").read_text())["dsc"] > 0.5
    assert (demo / "model").is_dir() and (demo / "overlay.png").is_file()
    assert (tmp_path / "seg.nii.gz").is_file() and "dsc" in printed.lower()
    with open(tmp_path / "study-bids-seg" / "lesions.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 4 and all(row["status"] == "ok" for row in rows)
    assert (tmp_path / "my-model" / "weights").is_dir()
