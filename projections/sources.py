"""Which bytes of each log are new since its watermark, and whether they follow on.

A log is one node's event directory (segments, see `events.segments`). Its
watermark, stored in the `logs` table in the same transaction as the rows it
produced, is (seq, segment, offset, hash): the last record applied, the
segment holding it, the byte offset just past its newline, and the SHA-256
of its line. Catching up plans one chunk a segment with new bytes:

- Only complete lines are planned. A chunk ends at the last newline of its
  segment; in the last segment, a final line that does not decode is left
  out as well (the writer cuts such a line as a torn tail). A half-written
  tail is therefore never applied; once completed, it is the start of the
  next catch-up's first chunk.
- DuckDB reads a sealed segment (not the last one; the writer never touches
  it again) whole, in place. Any other range (the bytes after a watermark,
  or the segment still being appended to) is copied first, up to the last
  complete line, into a private scratch file, and DuckDB reads that: DuckDB
  cannot read a byte range, and this way it never sees a byte past the
  newline we chose, whatever the writer does meanwhile.
- Cheap chain checks: the line before the watermark offset still hashes to
  the watermark's hash; each chunk's first record has seq one more than the
  record before it and `prev` equal to that record's hash. Inside a chunk,
  seq continuity is checked in SQL after loading (`projections.load`). The
  full hash chain is `spool events verify`'s job.

Failure rules: a mismatch, a missing or shortened segment, a record that
does not decode, raise LogBroken (which says to run `spool events verify`);
OSError becomes ProjectionError (StorageFull for a full disk).
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import msgspec

from events.schema import GENESIS
from events.segments import first_seq_of, last_lines, list_segments
from projections.errors import LogBroken, ProjectionError, from_os

BLOCK = 1 << 16
COPY_BLOCK = 8 << 20


class Envelope(msgspec.Struct, frozen=True):
    """What the planner reads of a record: its place in the chain. The payload
    is not decoded, so records of event types newer than this code still load."""

    prev: str
    seq: int
    node: str


_envelope = msgspec.json.Decoder(Envelope)


def decode_envelope(line: bytes) -> Envelope:
    """Raises msgspec.DecodeError for a line that is not a complete record."""
    return _envelope.decode(line)


@dataclass(frozen=True)
class Watermark:
    """How far one log has been applied."""

    path: str  # the log directory, resolved
    node: str  # node of the last record applied
    seq: int
    segment: str
    offset: int
    hash: str


@dataclass(frozen=True)
class Chunk:
    """Complete lines of one segment, [start, end), for DuckDB to load from `source`."""

    log: str
    segment: str
    source: Path
    start: int
    end: int
    first_seq: int
    last_seq: int
    last_hash: str
    last_node: str


def expand(entries: list[str | Path], *, must_exist: bool) -> list[Path]:
    """Event directories from paths and globs, resolved, in order, each once."""
    out: list[Path] = []
    for entry in entries:
        text = str(entry)
        if any(c in text for c in "*?["):
            matches = sorted(Path(m) for m in glob.glob(text) if os.path.isdir(m))
            if not matches:
                raise ProjectionError(f"no event log directory matches {text}")
        else:
            matches = [Path(text)]
            if must_exist and not matches[0].is_dir():
                raise ProjectionError(f"no event log directory {text}")
        for path in matches:
            resolved = path.resolve()
            if resolved not in out:
                out.append(resolved)
    return out


def plan(log_dir: Path, mark: Watermark | None, scratch: Path) -> list[Chunk]:
    """The chunks past `mark` (all of the log when None), checked to follow on."""
    log = str(log_dir)
    segments = list_segments(log_dir)
    names = [p.name for p in segments]
    prev_seq, prev_hash = (mark.seq, mark.hash) if mark else (0, GENESIS)
    if mark is None:
        todo = [(p, 0) for p in segments]
    else:
        if mark.segment not in names:
            raise LogBroken(
                f"event log {log}: segment {mark.segment}, read up to seq {mark.seq}, is gone "
                "(log truncated or replaced)",
                log=log,
                seq=mark.seq,
            )
        at = names.index(mark.segment)
        todo = [(segments[at], mark.offset)] + [(p, 0) for p in segments[at + 1 :]]
    chunks: list[Chunk] = []
    for path, start in todo:
        is_last = path == segments[-1]
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if mark is not None and path.name == mark.segment:
                    _check_watermark(f, size, mark, log)
                if size <= start:
                    continue
                end, last_line = _complete_end(f, path, size, is_last, log)
                if end <= start:
                    continue
                first = _decode(_line_at(f, start, end), path, start, log)
                last = _decode(last_line, path, end - len(last_line) - 1, log)
        except FileNotFoundError:
            raise LogBroken(f"event log {log}: segment {path.name} vanished while read", log=log) from None
        except OSError as exc:
            raise from_os(exc, f"cannot read event log segment {path}") from exc
        if first.seq != prev_seq + 1 or first.prev != prev_hash:
            raise LogBroken(
                f"event log {log}: segment {path.name} offset {start}: seq {first.seq} does not follow "
                f"seq {prev_seq} (gap or broken chain)",
                log=log,
                seq=first.seq,
            )
        if start == 0 and first_seq_of(path) != first.seq:
            raise LogBroken(
                f"event log {log}: segment {path.name} starts with seq {first.seq}", log=log, seq=first.seq
            )
        last_hash = hashlib.sha256(last_line).hexdigest()
        source = path
        if is_last or start != 0 or end != size:
            source = scratch / f"{len(chunks):04d}-{hashlib.sha1(log.encode()).hexdigest()[:8]}-{path.name}"
            _copy_range(path, start, end, source)
        chunks.append(Chunk(log, path.name, source, start, end, first.seq, last.seq, last_hash, last.node))
        prev_seq, prev_hash = last.seq, last_hash
    return chunks


def head_seq(log_dir: Path) -> int:
    """The seq of the last complete record of a log (0 if none), payloads not decoded."""
    for path in reversed(list_segments(log_dir)):
        for line in reversed(last_lines(path, 2)):
            try:
                return decode_envelope(line).seq
            except msgspec.DecodeError:
                continue
    return 0


def _decode(line: bytes, path: Path, offset: int, log: str) -> Envelope:
    try:
        return decode_envelope(line)
    except msgspec.DecodeError as exc:
        raise LogBroken(
            f"event log {log}: segment {path.name} offset {offset}: record does not decode ({exc})", log=log
        ) from exc


def _line_at(f: BinaryIO, start: int, end: int) -> bytes:
    """The line that starts at `start` (a newline is known to come before `end`)."""
    f.seek(start)
    data = b""
    while b"\n" not in data and start + len(data) < end:
        data += f.read(min(BLOCK, end - start - len(data)))
    return data.split(b"\n", 1)[0]


def _lines_before(f: BinaryIO, end: int, count: int) -> list[tuple[int, bytes]]:
    """Up to `count` complete lines ending at or before `end` (which follows a newline), last first."""
    back = BLOCK
    while True:
        back = min(back, end)
        f.seek(end - back)
        data = f.read(back)
        pieces = data[:-1].split(b"\n") if data.endswith(b"\n") else []
        if back == end or len(pieces) > count:
            break
        back *= 4
    out: list[tuple[int, bytes]] = []
    pos = end
    for i, line in enumerate(reversed(pieces)):
        if i == len(pieces) - 1 and back < end:
            break  # may be a partial line
        pos -= len(line) + 1
        out.append((pos, line))
        if len(out) == count:
            break
    return out


def _complete_end(f: BinaryIO, path: Path, size: int, is_last: bool, log: str) -> tuple[int, bytes]:
    """(offset past the last line to apply, that line); (0, b"") when there is none."""
    back = BLOCK
    while True:
        back = min(back, size)
        f.seek(size - back)
        data = f.read(back)
        nl = data.rfind(b"\n")
        if nl >= 0 or back == size:
            break
        back *= 4
    if nl < 0:
        if not is_last:
            raise LogBroken(f"event log {log}: sealed segment {path.name} has no complete line", log=log)
        return 0, b""
    end = size - back + nl + 1
    if not is_last and end != size:
        raise LogBroken(f"event log {log}: sealed segment {path.name} ends in the middle of a line", log=log)
    candidates = _lines_before(f, end, 2)
    if not is_last:
        return end, candidates[0][1]
    for pos, line in candidates:  # like the writer: an undecodable last line is a torn tail
        try:
            decode_envelope(line)
        except msgspec.DecodeError:
            if pos == 0:
                return 0, b""
            continue
        return pos + len(line) + 1, line
    raise LogBroken(
        f"event log {log}: segment {path.name} offset {candidates[-1][0]}: the last two records do not decode",
        log=log,
    )


def _check_watermark(f: BinaryIO, size: int, mark: Watermark, log: str) -> None:
    found = _lines_before(f, mark.offset, 1) if 0 < mark.offset <= size else []
    if not found or hashlib.sha256(found[0][1]).hexdigest() != mark.hash:
        raise LogBroken(
            f"event log {log}: segment {mark.segment} no longer holds seq {mark.seq} at offset "
            f"{mark.offset} (log truncated or replaced)",
            log=log,
            seq=mark.seq,
        )


def _copy_range(src: Path, start: int, end: int, dest: Path) -> None:
    try:
        with open(src, "rb") as fin, open(dest, "wb") as fout:
            fin.seek(start)
            left = end - start
            while left > 0:
                block = fin.read(min(COPY_BLOCK, left))
                if not block:
                    raise LogBroken(f"event log segment {src} shrank while read", log=str(src.parent))
                fout.write(block)
                left -= len(block)
    except OSError as exc:
        raise from_os(exc, f"cannot copy {src} to {dest}") from exc
