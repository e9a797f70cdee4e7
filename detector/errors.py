"""The one exception type users see: a one-line message naming the file, key or row at fault, and the one
did-you-mean hint every such message uses. Imports nothing of ours, so every layer may import it."""

from __future__ import annotations

import difflib
import errno
from collections.abc import Iterable
from pathlib import Path


class DetectorError(Exception):
    """Bad input or an unrecoverable fault; the CLI prints `str(err)` on one line and exits non-zero."""


class TrainingDiverged(DetectorError):
    """A run stopped by non-finite losses: its recipe is at fault, not its input (`detector tune` scores such a
    trial 0 and goes on)."""


def did_you_mean(name: object, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, matched case-insensitively and shown as spelled, or ''.

    One helper for every 'unknown key / module / name' message, so they all read the same."""
    by_lower = {str(c).lower(): str(c) for c in choices}
    close = difflib.get_close_matches(str(name).lower(), list(by_lower), n=1, cutoff=0.6)
    return f" (did you mean '{by_lower[close[0]]}'?)" if close else ""


def write_failed(path: Path | str, err: OSError, what: str = "") -> DetectorError:
    """The one-line error for a file a run or command could not write (disk full, quota, read-only folder):
    '<path>: cannot write <what> (<reason>)', so a full disk names the file, as the checkpoint writer does."""
    reason = err.strerror or errno.errorcode.get(err.errno or 0, str(err))
    return DetectorError(f"{path}: cannot write{f' {what}' if what else ''} ({reason})")
