"""The one exception type users see: a one-line message naming the file, key or row at fault."""


class DetectorError(Exception):
    """Bad input or an unrecoverable fault; the CLI prints `str(err)` on one line and exits non-zero."""
