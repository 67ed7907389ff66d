"""Message IDs: 26 characters of Crockford base32, ULID layout.

48 bits of milliseconds since the epoch (so IDs sort by time) then 80 random
bits from os.urandom (so IDs from any process on any node never collide in
practice). Within one process IDs also sort in the order they were made
(ULID's monotonic mode): in the same millisecond, the next ID is the last one
plus one. (A clock stepping back starts afresh: the millisecond stays true.) Only [0-9A-Z] minus I, L, O, U: safe as a file name everywhere,
and nothing path-like ever validates.
"""

from __future__ import annotations

import os
import re
import threading

from events import clock
from spoolfs.errors import InvalidId

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
ID_LENGTH = 26
_ID_RE = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")


_lock = threading.Lock()
_last = 0


def new_id() -> str:
    global _last
    ms = int(clock.now().timestamp() * 1000)
    with _lock:
        value = (ms << 80) | int.from_bytes(os.urandom(10), "big")
        if value >> 80 == _last >> 80:
            value = _last + 1
        _last = value
    chars = []
    for _ in range(ID_LENGTH):
        chars.append(ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def check_id(value: str) -> str:
    """Return `value` if it is a message ID, else raise InvalidId naming it."""
    if not _ID_RE.fullmatch(value):
        shown = value if len(value) <= 60 else value[:57] + "..."
        raise InvalidId(f"not a message ID: {shown!r}")
    return value
