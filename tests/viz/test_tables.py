"""format_table: the aligned plain-text tables of `info`, the evaluator's per-class table and the benchmarks."""

from __future__ import annotations

from detector.viz.tables import format_table


def test_numbers_align_right_text_left_and_bools_read_as_words() -> None:
    """A column is numeric only when all its values are ints or floats; bools and None are text."""
    rows = [["a", 1234, 0.5, True, None], ["bb", 5, 1.25, False, None]]
    text = format_table(["name", "n", "x", "flag", "note"], rows)
    assert text.splitlines() == [
        "name      n      x  flag   note",  # widths 4, 5 (1,234), 5 (0.500), 5 (False), 4 (the header)
        "----  -----  -----  -----  ----",
        "a     1,234  0.500  True",  # trailing blanks stripped
        "bb        5  1.250  False",
    ]
    assert format_table(["x"], [[0.25]], floatfmt=".1f").splitlines()[-1] == "0.2"  # round half to even
