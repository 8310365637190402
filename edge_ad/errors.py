"""User-facing errors.

Anything raised as an :class:`EdgeADError` is a problem with the user's input or environment
(a bad path, an unknown product, no network). The CLI prints its message as one line and exits
non-zero; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class EdgeADError(Exception):
    """A problem the user can fix; its message is shown as one line without a traceback."""

    exit_code: int = 1


class DatasetError(EdgeADError):
    """The dataset is missing, empty, in an unknown layout or inconsistent."""


class DownloadError(EdgeADError):
    """A download failed (offline, HTTP error, checksum mismatch)."""


class ConfigError(EdgeADError):
    """A configuration file or option is invalid."""


def first_line(exc: BaseException) -> str:
    """An exception as one line for a user-facing message: its first line, or its type's name
    when it has no text."""
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
