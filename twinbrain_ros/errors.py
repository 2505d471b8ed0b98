"""Errors that carry a cause: a short, fixed key for counting, rate-limited logs and diagnostics.

A cause names a kind of failure (`unsupported_encoding`, `ik_failed`), never a value taken from
the input, so that counters keyed by cause stay bounded whatever a sender puts in its messages.
"""

from __future__ import annotations


class CausedError(Exception):
    """An error with a `cause` key next to its human-readable message."""

    def __init__(self, cause: str, message: str):
        """Store the cause key next to the message."""
        super().__init__(message)
        self.cause = cause


def shorten(text: str, limit: int = 80) -> str:
    """`text` cut to `limit` characters (with its length said), for logs of untrusted input."""
    text = str(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"
