"""Retry timing: when to try a deferred message again, and when to give up.

Failure rules: none raised. The delay doubles from `min_backoff` after each
failed attempt and never exceeds `max_backoff`; a message older than
`lifetime` seconds has expired, and what is still pending then bounces.
"""

from __future__ import annotations

import datetime as dt

# 2**64 times any sane minimum is far beyond any maximum; stop doubling there.
_MAX_DOUBLINGS = 64


def next_attempt_delay(attempts: int, min_backoff: float, max_backoff: float) -> float:
    """Seconds to wait after `attempts` failed attempts (1 -> min, 2 -> 2*min, ... <= max)."""
    doublings = min(max(attempts, 1) - 1, _MAX_DOUBLINGS)
    return float(min(min_backoff * 2.0**doublings, max_backoff))


def expired(received_at: dt.datetime, now: dt.datetime, lifetime: float) -> bool:
    """True once the message has been in the spool for `lifetime` seconds or more."""
    return now - received_at >= dt.timedelta(seconds=lifetime)
