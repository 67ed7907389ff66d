"""Reading the log: by seq range, time range and type, and following it.

Readers never take the append lock and never see a torn tail: only complete
lines are returned. A line that does not decode raises LogError naming its
segment and offset (run `spool events verify` to see why).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec

from events.errors import LogError
from events.schema import Record, decode_record
from events.segments import first_seq_of, last_lines, line_seq, list_segments, read_lines


def _decode(line: bytes, path: Path, offset: int) -> Record:
    try:
        return decode_record(line)
    except msgspec.DecodeError as exc:
        raise LogError(
            f"event log segment {path.name} offset {offset}: record does not decode ({exc}); "
            "run `spool events verify`"
        ) from exc


def _segments_from(directory: Path, from_seq: int) -> list[Path]:
    segments = list_segments(directory)
    start = 0
    for i, path in enumerate(segments):
        if first_seq_of(path) <= from_seq:
            start = i
    return segments[start:]


def read_records(
    directory: Path,
    *,
    from_seq: int = 1,
    to_seq: int | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    types: Iterable[str] | None = None,
) -> Iterator[Record]:
    """Records with from_seq <= seq <= to_seq, since <= at < until, of the given types."""
    wanted = set(types) if types else None
    # A line of another type is skipped without decoding it: followers that
    # want a few types (the supervisor) must not pay for every record.
    markers = tuple(b'"type":"' + t.encode() + b'"' for t in wanted) if wanted else ()
    for path in _segments_from(Path(directory), from_seq):
        for offset, line in read_lines(path):
            try:
                seq = line_seq(line)
            except ValueError:
                seq = _decode(line, path, offset).seq
            if seq < from_seq:
                continue
            if to_seq is not None and seq > to_seq:
                return
            if markers and not any(m in line for m in markers):
                continue
            record = _decode(line, path, offset)
            if since is not None and record.at < since:
                continue
            if until is not None and record.at >= until:
                continue
            if wanted is not None and record.type not in wanted:
                continue
            yield record


@dataclass
class Cursor:
    """Where a follower stopped: the next seq, and the byte in its segment."""

    next_seq: int = 1
    segment: Path | None = None
    offset: int = 0


def poll(directory: Path, cursor: Cursor, types: Iterable[str] | None = None) -> tuple[list[Record], Cursor]:
    """The records past `cursor` (of `types` only, if given), and the cursor after them.

    Reads only the bytes past the cursor, so a follower polling every
    fraction of a second does not re-read its segment each time. Records of
    other types are passed over without being decoded.
    """
    wanted = set(types) if types else None
    markers = tuple(b'"type":"' + t.encode() + b'"' for t in wanted) if wanted else ()
    found: list[Record] = []
    segments = _segments_from(Path(directory), cursor.next_seq)
    if cursor.segment is not None and cursor.segment in segments:
        segments = segments[segments.index(cursor.segment) :]
    next_seq, segment, offset = cursor.next_seq, cursor.segment, cursor.offset
    for path in segments:
        start = offset if path == segment else 0
        for line_offset, line in read_lines(path, start):
            segment, offset = path, line_offset + len(line) + 1
            try:
                seq = line_seq(line)
            except ValueError:
                seq = _decode(line, path, line_offset).seq
            if seq < next_seq:
                continue
            next_seq = seq + 1
            if markers and not any(m in line for m in markers):
                continue
            record = _decode(line, path, line_offset)
            if wanted is None or record.type in wanted:
                found.append(record)
    return found, Cursor(next_seq, segment, offset)


def last_records(directory: Path, count: int) -> list[Record]:
    """The last `count` records of the log, oldest first."""
    out: list[Record] = []
    for path in reversed(list_segments(Path(directory))):
        lines = last_lines(path, count - len(out))
        out[:0] = [_decode(line, path, -1) for line in lines]
        if len(out) >= count:
            break
    return out


def line_hash(directory: Path, seq: int) -> str | None:
    """The SHA-256 of record `seq`'s line (what the next record's `prev` names), or None if it is not there.

    Read from the next record's `prev` when there is one, else from the
    last line of the log; a snapshot of anything built from the log up to
    `seq` can be checked against it later.
    """
    if seq < 1:
        return None
    for record in read_records(directory, from_seq=seq + 1, to_seq=seq + 1):
        return record.prev
    for path in reversed(list_segments(Path(directory))):
        lines = last_lines(path, 1)
        if lines:
            try:
                last = line_seq(lines[0])
            except ValueError:
                return None
            return hashlib.sha256(lines[0]).hexdigest() if last == seq else None
    return None


def head_seq(directory: Path) -> int:
    last = last_records(directory, 1)
    return last[0].seq if last else 0


def follow(
    directory: Path,
    *,
    from_seq: int = 1,
    poll: float = 0.2,
    stop: Callable[[], bool] = lambda: False,
) -> Iterator[Record]:
    """Every record from `from_seq` on, waiting for new ones until `stop()` is true."""
    next_seq = from_seq
    while not stop():
        got = False
        for record in read_records(directory, from_seq=next_seq):
            next_seq = record.seq + 1
            got = True
            yield record
            if stop():
                return
        if not got:
            time.sleep(poll)
