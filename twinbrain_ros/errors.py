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


# A byte-level BPE token covers at least one character: a user text longer than this many
# characters per allowed token is refused before any work is spent on it (tokenizing included).
MAX_CHARS_PER_TOKEN = 8


def refuse_long_text(text: str, max_tokens: int, kind: str = "instruction",
                     limit_name: str = "max_instruction_tokens", error=CausedError) -> None:
    """Raise `error(f"{kind}_too_long", ...)` when `text` cannot fit `max_tokens` tokens.

    The cheap check every entry point makes before tokenizing an instruction or a question;
    `error` is the caller's `CausedError` subclass.
    """
    if len(text) > MAX_CHARS_PER_TOKEN * max_tokens:
        raise error(f"{kind}_too_long", f"{kind} of {len(text)} characters is longer than "
                                        f"{max_tokens} tokens ({limit_name})")


def shorten(text: str, limit: int = 80) -> str:
    """`text` cut to `limit` characters (with its length said), for logs of untrusted input."""
    text = str(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"
