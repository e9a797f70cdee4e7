"""The package's shape, checked from the source (issue 15): imports run one way, and functions stay short.

Parsing with `ast` (nothing is imported) sees every import, lazy ones inside functions included.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "detector"

# The layers, top to bottom: a module imports from its own layer or the ones below, never from above.
# The cli uses everything; tools (ablate, benches) open checkpoints through the Detector like any user; the
# Detector (api.py, and the package's __init__ that exports it) drives training and inference; training
# validates through inference; both run on runtime (device, checkpoints, distributed), which loads models;
# models and data are the ground they stand on, with viz (plots, logger, tables) and the option machinery below.
LAYERS = {
    "detector.cli": 7, "detector.__main__": 7,
    "detector.tools": 6,
    "detector.api": 5,
    "detector.train": 4,
    "detector.infer": 3,
    "detector.runtime": 2,
    "detector.models": 1, "detector.data": 1,
    "detector.viz": 0, "detector.config": 0, "detector.options": 0, "detector.yamlfile": 0, "detector.memory": 0,
    "detector.errors": 0, "detector.version": 0, "detector.folders": 0,
}
FACE = 5  # `detector` itself, and names of its __init__ (detector.Detector)

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


def layer_of(name: str) -> int | None:
    """The layer of a dotted module (or of a name inside one); None for the bare package `detector` (the anchor
    of `from detector import memory`, whose target is checked on its own) and for modules outside the package."""
    if name == "detector" or not name.startswith("detector."):
        return None
    matches = [prefix for prefix in LAYERS if name == prefix or name.startswith(prefix + ".")]
    return LAYERS[max(matches, key=len)] if matches else FACE


def test_the_import_checker_sees_lazy_relative_and_from_imports() -> None:
    """The checker itself: one that sees nothing passes everything."""
    source = "import detector.train.loss\nfrom detector import api\nfrom ..infer import predictor\ndef f():\n    from detector.cli import main\n"
    names = {name for _, name in imported_names(source, "detector.models")}
    assert {"detector.train.loss", "detector.api", "detector.infer.predictor", "detector.cli.main"} <= names
    assert [layer_of(n) for n in ("detector.cli.main", "detector.Detector", "detector.tools.bench.val")] == [7, 5, 6]
    assert [layer_of(n) for n in ("detector.viz.plots", "detector.data.spec", "detector", "torch.nn")] == [0, 1, None, None]


def test_every_module_has_a_layer() -> None:
    unplaced = [_module_name(p) for p in _modules() if not any(
        _module_name(p) == prefix or _module_name(p).startswith(prefix + ".") for prefix in LAYERS)
        and _module_name(p) != "detector"]
    assert not unplaced, f"add these modules' folder to LAYERS: {unplaced}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_never_run_upward(path: Path) -> None:
    own = layer_of(_module_name(path)) if _module_name(path) != "detector" else FACE
    found = imported_names(path.read_text(), _package_of(path))
    upward = sorted({f"line {line}: {name}" for line, name in found if (layer_of(name) or 0) > own})
    assert not upward, f"detector/{path.relative_to(PACKAGE)} (layer {own}) imports from a layer above it: {upward}"


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
