"""The package's shape, checked from the source (issue 15): imports run one way, and functions stay short.

Parsing with `ast` (nothing is imported) sees every import, lazy ones inside functions included.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "detector"

# models/ and data/ are the ground the engine, the benches and the face stand on: they never import those.
# detector.config is still imported by data/ (its specs) and by the builder (model-name lookup); that arrow is
# allowed for now and goes when the options and specs move below (issue 15, item 8).
LOWER_LAYERS = ("models", "data")
UPPER_MODULES = ("detector.engine", "detector.bench", "detector.api", "detector.cli", "detector.ablate")

MAX_FUNCTION_LINES = 60
# Functions allowed over MAX_FUNCTION_LINES, as "path/relative/to/detector.py::Qualified.name": lines. Empty today;
# one the trainer/evaluator split (issue 15) still needs goes here with its length, and leaves when it is split.
LONG_FUNCTIONS: dict[str, int] = {}


def _modules(*folders: str) -> list[Path]:
    roots = [PACKAGE / f for f in folders] if folders else [PACKAGE]
    return sorted(p for root in roots for p in root.rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(source: str, package: str) -> Iterator[tuple[int, str]]:
    """(line, dotted module) for every import in `source`, a module of `package`; `from a import b` yields both
    `a` and `a.b` (b may be a module), and relative imports are resolved against `package`."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def _package_of(path: Path) -> str:
    name = _module_name(path)
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _is_upper(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in UPPER_MODULES)


def test_the_import_checker_sees_lazy_relative_and_from_imports() -> None:
    """The checker itself: one that sees nothing passes everything."""
    source = "import detector.engine.loss\nfrom detector import api\nfrom ..engine import trainer\ndef f():\n    from detector.cli import main\n"
    names = {name for _, name in imported_names(source, "detector.models")}
    assert {"detector.engine.loss", "detector.api", "detector.engine.trainer", "detector.cli.main"} <= names
    assert all(_is_upper(n) for n in ("detector.engine", "detector.api.Detector", "detector.cli"))
    assert not any(_is_upper(n) for n in ("detector.config", "detector.engineering", "detector.models.blocks"))


@pytest.mark.parametrize("path", _modules(*LOWER_LAYERS), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_models_and_data_never_import_upward(path: Path) -> None:
    found = imported_names(path.read_text(), _package_of(path))
    upward = sorted({f"line {line}: {name}" for line, name in found if _is_upper(name)})
    assert not upward, f"detector/{path.relative_to(PACKAGE)} imports from a layer above models/ and data/: {upward}"


def function_lengths() -> dict[str, int]:
    """'path::Qualified.name' -> lines from `def` to the function's last line, for every function in the package
    (methods and nested functions included; a nested function also counts towards its parent)."""
    lengths: dict[str, int] = {}

    def visit(node: ast.AST, path: str, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                lengths[f"{path}::{name}"] = child.end_lineno - child.lineno + 1
                visit(child, path, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, path, prefix + child.name + ".")
            else:
                visit(child, path, prefix)

    for module in _modules():
        visit(ast.parse(module.read_text(), str(module)), module.relative_to(PACKAGE).as_posix(), "")
    return lengths


def test_no_function_is_longer_than_60_lines() -> None:
    lengths = function_lengths()
    long = {name: n for name, n in lengths.items() if n > MAX_FUNCTION_LINES and name not in LONG_FUNCTIONS}
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them into named steps): {long}"
    grown = {name: (lengths[name], n) for name, n in LONG_FUNCTIONS.items() if name in lengths and lengths[name] > n}
    assert not grown, f"allow-listed functions grew past their recorded length (now, recorded): {grown}"


def test_long_function_allow_list_has_no_stale_entries() -> None:
    """An allow-listed function that was split (or removed) leaves the list, so the list only shrinks."""
    lengths = function_lengths()
    stale = [name for name in LONG_FUNCTIONS if lengths.get(name, 0) <= MAX_FUNCTION_LINES]
    assert not stale, f"remove from LONG_FUNCTIONS (now {MAX_FUNCTION_LINES} lines or fewer, or gone): {stale}"
