"""Aligned plain-text tables, shared by `info`, the evaluator's per-class table and the benchmarks."""

from __future__ import annotations

from collections.abc import Sequence


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, floatfmt: str = ".3f") -> str:
    """Right-align numbers, left-align text; floats use `floatfmt`, ints get thousands separators."""

    def cell(value: object) -> str:
        if isinstance(value, bool) or value is None:
            return "" if value is None else str(value)
        if isinstance(value, int):
            return f"{value:,}"
        if isinstance(value, float):
            return format(value, floatfmt)
        return str(value)

    text_rows = [[cell(v) for v in row] for row in rows]
    numeric = [
        all(isinstance(row[i], (int, float)) and not isinstance(row[i], bool) for row in rows if i < len(row))
        for i in range(len(headers))
    ]
    widths = [max([len(h)] + [len(r[i]) for r in text_rows if i < len(r)]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    out = [line(list(headers)), line(["-" * w for w in widths])]
    out += [line(r) for r in text_rows]
    return "\n".join(out)
