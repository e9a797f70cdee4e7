"""The one YAML reader: `yaml.safe_load` semantics, bounded before anything is built.

Every YAML this project reads (train configs, dataset YAMLs, model YAMLs) goes through `load_yaml`, which
refuses, in one line naming the file:
- a file over `MAX_BYTES` (4 MiB; configs are kilobytes) or text that is not UTF-8;
- nesting deeper than `MAX_DEPTH` (64) collections, reported with its line;
- more than `MAX_NODES` (100,000) nodes once aliases are expanded (an alias bomb is a few hundred bytes that
  expand to billions of nodes: code that walks the data would hang or exhaust memory);
- an alias inside the collection it names (``a: &x [*x]``): a structure that contains itself, which code that
  walks the data would recurse into forever;
- tags that construct Python objects (``!!python/object/apply``): `safe_load` refuses them, nothing runs;
- a key written twice in one mapping, which `safe_load` would resolve by dropping the first value silently.

The bounds are checked on PyYAML's event stream, which is read iteratively, so a hostile file fails in
milliseconds and before the recursive composer or constructor ever sees it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from detector.errors import DetectorError

MAX_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 64
MAX_NODES = 100_000
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser when PyYAML was built with it (10-50x faster)


def load_yaml(path: str | Path) -> tuple[Any, dict[str, int]]:
    """Read a YAML file safely; return its data and a map from dotted key path to 1-based line number."""
    path = Path(path)
    text = _read_text(path)
    try:
        _check_bounds(text, path)
        node, data = _compose_and_construct(text, path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise DetectorError(f"{where}: invalid YAML: {problem}") from None
    except ValueError as err:  # a scalar the constructor cannot build: a date 2024-13-01, an int of 5,000 digits
        raise DetectorError(f"{path}: invalid YAML: {str(err).splitlines()[0]}") from None
    lines: dict[str, int] = {}
    _collect_lines(node, "", lines)
    return data, lines


def _refuse_repeated_keys(node: yaml.Node | None, path: Path) -> None:
    """A key written twice in one mapping: `safe_load` keeps the last value and drops the first without a word (a
    second `head:` would drop a model's whole head). Keys a merge (`<<: *base`) brings in are not written there,
    so overriding them stays allowed. Walks each node once (aliases share nodes)."""
    todo, seen, keys = [node], set(), yaml.constructor.SafeConstructor()
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, value_node in current.value:
                line = key_node.start_mark.line + 1
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    key = _key_value(keys, key_node)  # as the dict will hold it: 0 and 0x0 are one key
                    if key in first_line:
                        read = f", read as {key!r}" if str(key) != key_node.value else ""
                        raise DetectorError(f"{path}:{line}: key '{key_node.value}' is given twice (first on line "
                                            f"{first_line[key]}{read}); one of the values would be dropped")
                    first_line[key] = line
                todo += [key_node, value_node]
        elif isinstance(current, yaml.SequenceNode):
            todo += current.value


def _key_value(constructor: yaml.constructor.SafeConstructor, node: yaml.ScalarNode) -> Any:
    """A scalar key as safe_load builds it (0x0 -> 0, yes -> True), or its text where it cannot be built."""
    try:
        value = constructor.construct_object(node)
        hash(value)
        return value
    except (yaml.YAMLError, ValueError, TypeError, OverflowError):
        return node.value


def _compose_and_construct(text: str, path: Path) -> tuple[yaml.Node | None, Any]:
    """The node graph (for the line numbers) and the data built from that same graph: one parse, not two. Repeated
    keys are looked for in between: constructing inlines merged keys into the graph."""
    loader = LOADER(text)
    try:
        node = loader.get_single_node()
        _refuse_repeated_keys(node, path)
        return node, loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()


def _read_text(path: Path) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise DetectorError(f"{path}: {size:,} bytes is too large for a YAML config (limit {MAX_BYTES:,})")
        with path.open("rb") as f:
            raw = f.read(MAX_BYTES + 1)  # bounded: a device or a pipe (/dev/zero) has no size to check first
        if len(raw) > MAX_BYTES:
            raise DetectorError(f"{path}: more than {MAX_BYTES:,} bytes is too large for a YAML config")
    except FileNotFoundError:
        raise DetectorError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DetectorError(f"{path}: is a directory, not a YAML file") from None
    except OSError as err:
        raise DetectorError(f"{path}: cannot read ({err.strerror})") from None
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise DetectorError(f"{path}:{line}: not UTF-8 text (byte {err.start} is 0x{raw[err.start]:02x})") from None


def _check_bounds(text: str, path: Path) -> None:
    """Depth and alias-expanded node count from the event stream: one pass, no recursion."""
    open_counts: list[list[Any]] = []  # per open collection: [expanded node count, anchor]
    anchor_sizes: dict[str, int] = {}
    for event in yaml.parse(text, Loader=LOADER):
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            if len(open_counts) >= MAX_DEPTH:
                raise DetectorError(f"{path}:{event.start_mark.line + 1}: YAML nested deeper than {MAX_DEPTH} levels")
            open_counts.append([1, event.anchor])
            continue
        if isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            size, anchor = open_counts.pop()
        elif isinstance(event, yaml.ScalarEvent):
            size, anchor = 1, event.anchor
        elif isinstance(event, yaml.AliasEvent):
            if any(open_anchor == event.anchor for _, open_anchor in open_counts):  # the collection contains itself
                raise DetectorError(f"{path}:{event.start_mark.line + 1}: YAML alias *{event.anchor} refers to a "
                                    "collection that contains it (a recursive structure)")
            size, anchor = anchor_sizes.get(event.anchor, 1), None
        else:
            continue
        if anchor is not None:
            anchor_sizes[anchor] = size
        if open_counts:
            open_counts[-1][0] += size
            size = open_counts[-1][0]
        if size > MAX_NODES:
            raise DetectorError(f"{path}:{event.start_mark.line + 1}: YAML expands to more than {MAX_NODES:,} nodes "
                                "(aliases included)")


def _collect_lines(node: yaml.Node | None, prefix: str, out: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            out[key] = key_node.start_mark.line + 1
            _collect_lines(value_node, key + ".", out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            key = f"{prefix.rstrip('.')}[{i}]"
            out[key] = item.start_mark.line + 1
            _collect_lines(item, key + ".", out)
