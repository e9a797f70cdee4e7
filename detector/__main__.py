"""`python -m detector ...` (and `torchrun -m detector ...`) run the CLI."""

from detector.cli import run

raise SystemExit(run())
