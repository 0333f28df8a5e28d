"""The package's shape: no module reaches into another's private names (the layers and the absence of import
cycles, lazy and type-only imports included, are import-linter's contracts in setup.cfg, run by CI)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "jaxcascade"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_reaches() -> list[str]:
    """'module:line: what' for every use of another jaxcascade module's private name."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        here = _module_name(path)
        aliases: dict[str, str] = {}  # local name -> the jaxcascade module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxcascade"):
                for alias in node.names:
                    if _private(alias.name) and node.module != here:
                        found.append(f"{here}:{node.lineno}: from {node.module} import {alias.name}")
                    aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("jaxcascade") and alias.asname:
                        aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and aliases[node.value.id] != here):
                found.append(f"{here}:{node.lineno}: {node.value.id}.{node.attr}")
    return sorted(set(found))


def test_no_module_uses_another_modules_private_names():
    assert private_reaches() == []


MESSAGE_CALLS = {"UserError", "warn", "_warn"}


def flags_in_library_messages() -> list[str]:
    """'module:line: flag' for every flag of jaxcascade's command line (a `--config.KEY=VALUE` override, which
    the API takes too, apart) in a UserError or warning message below it, which names parameters instead."""
    from jaxcascade import cli

    commands = cli.build_parser()._subparsers._group_actions[0].choices
    flags = {option for command in commands.values() for option in command._option_string_actions}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        inside = path.relative_to(PACKAGE).parts
        if inside[0] in {"commands", "cli.py"}:
            continue
        for call in ast.walk(ast.parse(path.read_text(), str(path))):
            name = getattr(call, "func", None)
            name = getattr(name, "id", None) or getattr(name, "attr", None)
            if isinstance(call, ast.Call) and name in MESSAGE_CALLS:
                for node in ast.walk(call):
                    if isinstance(node, ast.Constant) and isinstance(node.value, str):
                        found += [f"{_module_name(path)}:{node.lineno}: {flag}"
                                  for flag in re.findall(r"--(?!config\.)[a-z][\w-]*", node.value) if flag in flags]
    return found


def test_library_messages_name_parameters_not_flags():
    assert flags_in_library_messages() == []


MAX_FUNCTION_LINES = 60
# Functions allowed over the limit while they are being split, as 'path:qualified name' (e.g.
# "segmentation/study.py:segment_study"); the test fails once one is back under the limit, so the set only
# shrinks. Empty: every function complies.
LONG_FUNCTIONS_ALLOWED: set[str] = set()


def long_functions(limit: int = MAX_FUNCTION_LINES) -> dict[str, int]:
    """{'path:qualified name': lines} of every function (method, nested function) longer than `limit` lines,
    counted from its `def` to its last line, docstring included."""
    found = {}

    def visit(node: ast.AST, path: str, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                lines = child.end_lineno - child.lineno + 1
                if not isinstance(child, ast.ClassDef) and lines > limit:
                    found[f"{path}:{name}"] = lines
                visit(child, path, f"{name}.")
            else:
                visit(child, path, prefix)

    for path in sorted(PACKAGE.rglob("*.py")):
        visit(ast.parse(path.read_text(), str(path)), path.relative_to(PACKAGE).as_posix(), "")
    return found


def test_no_function_is_longer_than_60_lines():
    found = long_functions()
    assert {name: lines for name, lines in found.items() if name not in LONG_FUNCTIONS_ALLOWED} == {}, (
        f"split these functions into named helpers (at most {MAX_FUNCTION_LINES} lines each)")
    assert sorted(LONG_FUNCTIONS_ALLOWED - set(found)) == [], "now short enough: remove from LONG_FUNCTIONS_ALLOWED"


def test_segmenting_a_subjects_files_returns_to_few_modules(trained_model, cohort, tmp_path):
    """The model directory's walk through `segment_files` (`benchmarks/walks.py`): read once and handed down,
    it comes back to a module it left at most 8 times (25 before the one-subject path)."""
    from benchmarks import walks
    from jaxcascade.segmentation.nifti_files import segment_files

    model = str(trained_model)
    inputs = {name: str(cohort / "held_out" / f"{name}.nii.gz") for name in ("T1", "FLAIR")}
    walk = walks.trace("segment_files", segment_files, model, model, inputs, str(tmp_path / "seg.nii.gz"))
    assert walk.modules >= 10 and walk.returns <= 8, walk.stays
