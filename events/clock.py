"""The one clock. Everything that needs the time calls `now()`.

Tests freeze it with freezegun (which patches `datetime.datetime`), or pass
`now` explicitly where a function takes it. Always timezone-aware UTC.
"""

from __future__ import annotations

import datetime as _dt

UTC = _dt.UTC


def now() -> _dt.datetime:
    return _dt.datetime.now(UTC)


def utc(value: _dt.datetime) -> _dt.datetime:
    """Return `value` as aware UTC; a naive value is taken to be UTC already."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)
