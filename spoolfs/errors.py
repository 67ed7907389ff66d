"""Errors of the spool layer; all are SpoolError (from events.errors)."""

from __future__ import annotations

from events.errors import SpoolError, StorageFull

__all__ = [
    "CorruptSidecar",
    "InvalidAddress",
    "InvalidId",
    "MessageBusy",
    "MessageNotFound",
    "SpoolError",
    "SpoolIOError",
    "StorageFull",
]


class InvalidId(SpoolError):
    """Not a message ID (path-like, wrong length or alphabet)."""


class MessageNotFound(SpoolError):
    """No message with that ID in the spool."""


class MessageBusy(SpoolError):
    """Another worker holds the message's claim (it is being delivered)."""


class CorruptSidecar(SpoolError):
    """A sidecar did not parse; the pair was moved to spool/corrupt/."""


class InvalidAddress(SpoolError):
    """Not an RFC 5321 mailbox."""


class SpoolIOError(SpoolError):
    """A filesystem operation on the spool failed (other than disk full)."""
