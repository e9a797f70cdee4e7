#!/usr/bin/env python3
"""`python scripts/bench.py <bench> key=value ...`: the same as `detector bench <bench> ...`, for every bench of
`detector.cli.BENCHES` (models, data, train, val, amp, export, track)."""

import sys

from detector.cli import BENCHES, main

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(f"usage: python scripts/bench.py {'|'.join(BENCHES)} [key=value ...]")
    sys.exit(main(["bench", *sys.argv[1:]]))
