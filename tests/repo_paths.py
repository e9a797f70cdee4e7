"""Where the checkout the tests run in lies, for the tests that run its scripts, read its configs or build its
package."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
