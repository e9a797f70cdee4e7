#!/usr/bin/env python3
"""`python scripts/bench.py models|data|train|val|amp key=value ...`: the same as `detector bench <name> ...`."""

import sys

from detector.cli import main

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python scripts/bench.py models|data|train|val|amp [key=value ...]")
    sys.exit(main(["bench", *sys.argv[1:]]))
