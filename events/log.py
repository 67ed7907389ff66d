"""The append-only, hash-chained event log: the writer.

Failure rules:
- An append is acknowledged (its future resolves) only after the bytes are
  written and fdatasync'ed. Many appends share one write and one fsync
  (group commit): a committer thread takes everything pending at once.
- Several processes may append. Each batch is written under an exclusive
  flock on `events/.lock`, after re-reading the tail from disk, so seq stays
  gap-free and `prev` always names the line really before it. The lock is
  released before the fdatasync, so one process writes while another
  syncs; a sync of the segment covers every batch written to it before,
  and a writer syncs the old segment before it starts a new one, so no
  record is ever durable while one it chains on is not.
- A torn tail (bytes after the last newline, or a last line that does not
  decode, as a crash mid-write leaves it) is cut off under the lock before
  the next write, kept in `SEGMENT.SEQ.torn`, and recorded by a
  `log_repaired` event. Nothing before it is touched.
- If a write or fsync fails, every append in the batch fails: ENOSPC/EDQUOT
  as StorageFull, anything else as LogError. A failed write is truncated
  back to where the batch began, so no partial line is ever left behind by
  us; so is a failed sync, unless another process has already written a
  batch that chains on ours: then ours stays, unacknowledged, like a batch
  written just before a crash.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import hashlib
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import msgspec

from events import clock
from events.errors import LogError, StorageFull
from events.schema import GENESIS, Event, LogRepaired, Record, decode_record, encode_record
from events.segments import PREV_END, PREV_START, last_lines, list_segments, segment_name

LOCK_NAME = ".lock"
DEFAULT_SEGMENT_BYTES = 64 << 20


def translate_os_error(exc: OSError, what: str) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(f"{what}: disk full ({exc.strerror})")
    return LogError(f"{what}: {exc.strerror or exc}")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class _Tail:
    path: Path
    size: int
    seq: int
    hash: str


class Ticket:
    """The promise of one submit: `result()` waits until the batch is durable.

    A bare lock instead of concurrent.futures.Future (a Condition, a list of
    waiters and a state machine each): at 100,000 appends a second, the
    Future alone cost a third of the CPU of an append.
    """

    __slots__ = ("_done", "_error", "_records", "_then")

    def __init__(self, then: Callable[[], None] | None = None) -> None:
        self._done = threading.Lock()
        self._done.acquire()
        self._records: list[Record] = []
        self._error: BaseException | None = None
        self._then = then  # called in the committer thread once settled

    def result(self, timeout: float | None = None) -> list[Record]:
        if not self._done.acquire(timeout=-1 if timeout is None else timeout):
            raise TimeoutError("the event log has not committed yet")
        self._done.release()
        if self._error is not None:
            raise self._error
        return self._records

    def _settle(self, records: list[Record], error: BaseException | None) -> None:
        self._records, self._error = records, error
        self._done.release()
        if self._then is not None:
            try:
                self._then()
            except Exception:  # e.g. the waiter's event loop is gone: the committer goes on
                pass


@dataclass
class _Pending:
    events: Sequence[Event]
    actor: str
    ticket: Ticket


class EventLog:
    """Appends events durably. Thread-safe; one instance per process is enough."""

    def __init__(
        self,
        directory: Path,
        *,
        node: str,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        now: Callable[[], dt.datetime] = clock.now,
    ) -> None:
        self.directory = Path(directory)
        self.node = node
        self.segment_bytes = segment_bytes
        self._now = now
        self._tail: _Tail | None = None
        self._fd: int | None = None
        self._fd_path: Path | None = None
        self._cond = threading.Condition()
        self._idle = False  # the committer waits on _cond: a submit must wake it
        self._pending: list[_Pending] = []
        self._thread: threading.Thread | None = None
        self._closing = False
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise translate_os_error(exc, f"cannot open event log {self.directory}") from exc

    # --- public API -----------------------------------------------------------

    def submit(
        self, events: Sequence[Event], actor: str, *, then: Callable[[], None] | None = None
    ) -> Ticket:
        """Queue events for the next group commit; the ticket gives their records.

        `then` is called (in the committer thread) once the ticket is settled."""
        ticket = Ticket(then)
        with self._cond:
            if self._closing:
                raise LogError("event log is closed")
            self._pending.append(_Pending(list(events), actor, ticket))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="event-log-committer", daemon=True)
                self._thread.start()
            elif self._idle:
                self._cond.notify()
        return ticket

    def append(self, event: Event, actor: str) -> Record:
        """Append one event and return its record once it is durable."""
        return self.submit([event], actor).result()[0]

    def append_many(self, events: Sequence[Event], actor: str) -> list[Record]:
        return self.submit(events, actor).result()

    async def append_async(self, event: Event, actor: str) -> Record:
        import asyncio  # here: importing asyncio costs every CLI command 30 ms

        loop = asyncio.get_running_loop()
        woken = asyncio.Event()

        def wake() -> None:
            loop.call_soon_threadsafe(woken.set)

        ticket = self.submit([event], actor, then=wake)
        await woken.wait()
        return ticket.result()[0]

    def repair(self) -> Record | None:
        """Cut a torn tail now if there is one; return the log_repaired record."""
        records = self.submit([], "system").result()
        return records[0] if records else None

    def close(self) -> None:
        if self._lock_fd < 0:
            return
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        os.close(self._lock_fd)
        self._lock_fd = -1

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the committer --------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._idle = True
                    self._cond.wait()
                    self._idle = False
                if not self._pending:
                    return
                batch, self._pending = self._pending, []
            try:
                records = self._commit(batch)
            except BaseException as exc:  # every waiter must hear about it
                for item in batch:
                    item.ticket._settle([], exc)
                continue
            for item, recs in zip(batch, records, strict=True):
                item.ticket._settle(recs, None)

    def _commit(self, batch: list[_Pending]) -> list[list[Record]]:
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            tail, repaired = self._sync_tail()
            at = clock.utc(self._now())
            lines: list[bytes] = []
            out: list[list[Record]] = []
            seq, prev = tail.seq, tail.hash

            def add(event: Event, actor: str) -> Record:
                nonlocal seq, prev
                seq += 1
                record = Record(prev=prev, seq=seq, at=at, actor=actor, node=self.node, payload=event)  # type: ignore[arg-type]
                line = encode_record(record)
                prev = hashlib.sha256(line).hexdigest()
                lines.append(line)
                return record

            repair_record = add(repaired, "system") if repaired is not None else None
            for item in batch:
                out.append([add(e, item.actor) for e in item.events])
            if repair_record is not None:
                # the log_repaired record goes to whoever asked for a repair, if anyone
                for item, recs in zip(batch, out, strict=True):
                    if not item.events:
                        recs.append(repair_record)
                        break
            if not lines:
                return out
            fd, start = self._write(tail, b"\n".join(lines) + b"\n", tail.seq + 1)
            tail.seq, tail.hash = seq, prev
            end = tail.size
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        # The sync runs outside the lock: another process writes its batch
        # meanwhile, and its own fdatasync of the same file covers ours too.
        try:
            os.fdatasync(fd)
        except OSError as exc:
            self._cut_back(fd, start, end, seq)
            raise translate_os_error(exc, "cannot append to event log") from exc
        return out

    def _write(self, tail: _Tail, data: bytes, first_seq: int) -> tuple[int, int]:
        """Write a batch after the tail, under the lock: (fd to sync, where it began)."""
        if tail.size > 0 and tail.size + len(data) > self.segment_bytes:
            # The batch before ours may still be syncing in another process; it
            # must be durable before anything that chains on it in a new file.
            old = self._open_segment(tail.path, create=False)
            try:
                os.fdatasync(old)
            except OSError as exc:
                raise translate_os_error(exc, f"cannot sync event log segment {tail.path.name}") from exc
            path = self.directory / segment_name(first_seq)
            self._open_segment(path, create=True)
            tail.path, tail.size = path, 0
        fd = self._open_segment(tail.path, create=True)
        start = tail.size
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
        except OSError as exc:
            try:
                os.ftruncate(fd, start)
                os.fdatasync(fd)
            except OSError:
                pass  # the torn-tail repair cleans it up on the next open
            raise translate_os_error(exc, "cannot append to event log") from exc
        tail.size += len(data)
        return fd, start

    def _cut_back(self, fd: int, start: int, end: int, last_seq: int) -> None:
        """After a failed sync: cut our batch off, unless a later one chains on it.

        A batch another process has written after ours (in this segment or a
        new one) cannot be cut out from under it; ours then stays, never
        acknowledged, as a batch written just before a crash would.
        """
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            self._tail = None  # re-read from disk next time
            if os.fstat(fd).st_size == end and not os.path.exists(
                self.directory / segment_name(last_seq + 1)
            ):
                os.ftruncate(fd, start)
                os.fdatasync(fd)
        except OSError:
            pass  # the torn-tail repair or `spool events verify` takes it from here
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _open_segment(self, path: Path, *, create: bool) -> int:
        if self._fd is not None and self._fd_path == path:
            return self._fd
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        try:
            existed = path.exists()
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | (os.O_CREAT if create else 0), 0o644)
            self._fd_path = path
            if not existed:
                fsync_dir(self.directory)
        except OSError as exc:
            raise translate_os_error(exc, f"cannot open event log segment {path}") from exc
        return self._fd

    def _sync_tail(self) -> tuple[_Tail, LogRepaired | None]:
        """Bring the cached tail up to date with the disk (under the lock).

        The cache is still right if our segment has not changed size and no
        one has started the next segment, which would be named after the seq
        that follows ours. Two stats instead of a directory listing: every
        system call here costs the committer a GIL hand-back while producer
        threads run, so the hot path makes as few as it can.
        """
        tail = self._tail
        if tail is not None:
            try:
                size = os.stat(tail.path).st_size
            except FileNotFoundError:
                size = -1
            except OSError as exc:
                raise translate_os_error(exc, "cannot stat event log") from exc
            if not os.path.exists(self.directory / segment_name(tail.seq + 1)):
                if size == tail.size:
                    return tail, None
                # (after reading on, the roll check again: the writer may have
                # filled our segment and started the next one)
                if (
                    size > tail.size
                    and self._read_on(tail, size)
                    and not os.path.exists(self.directory / segment_name(tail.seq + 1))
                ):
                    return tail, None
        tail, repaired = self._load_tail(list_segments(self.directory))
        self._tail = tail
        return tail, repaired

    def _read_on(self, tail: _Tail, size: int) -> bool:
        """Move the cached tail over what other processes appended since.

        Their batches are whole lines written under the lock; anything else
        (a torn end, a line that does not continue our chain) returns False
        and the full tail load, which repairs, takes over.
        """
        try:
            fd = os.open(tail.path, os.O_RDONLY)
            try:
                data = os.pread(fd, size - tail.size, tail.size)
            finally:
                os.close(fd)
        except OSError:
            return False
        if len(data) != size - tail.size or not data.endswith(b"\n"):
            return False
        if data[PREV_START:PREV_END] != tail.hash.encode():
            return False
        last = data[data.rfind(b"\n", 0, len(data) - 1) + 1 : -1]
        seq = _seq_of(last)
        if seq is None or seq <= tail.seq:
            return False
        tail.size, tail.seq, tail.hash = size, seq, hashlib.sha256(last).hexdigest()
        return True

    def _load_tail(self, segments: list[Path]) -> tuple[_Tail, LogRepaired | None]:
        if not segments:
            return _Tail(self.directory / segment_name(1), 0, 0, GENESIS), None
        current = segments[-1]
        repaired = self._cut_torn_tail(current, segments[:-1])
        size = os.stat(current).st_size
        # walk back over empty segments (a crash right after a roll leaves one)
        for path in reversed(segments):
            lines = last_lines(path, 1)
            if lines:
                try:
                    seq = decode_record(lines[0]).seq
                except msgspec.DecodeError as exc:
                    raise LogError(
                        f"event log segment {path.name}: last record does not decode; "
                        "run `spool events verify`"
                    ) from exc
                return _Tail(current, size, seq, hashlib.sha256(lines[0]).hexdigest()), repaired
        return _Tail(current, size, 0, GENESIS), repaired

    def _cut_torn_tail(self, path: Path, earlier: list[Path]) -> LogRepaired | None:
        try:
            with open(path, "r+b") as f:
                size = f.seek(0, os.SEEK_END)
                keep, after = _complete_prefix(f, size)
                if keep == size:
                    return None
                if keep == 0:  # nothing of this segment survives: the seq before is in an earlier one
                    for older in reversed(earlier):
                        lines = last_lines(older, 1)
                        if lines:
                            after = _seq_of(lines[0]) or 0
                            break
                f.seek(keep)
                torn = f.read()
                kept = path.with_name(f"{path.name}.{after}.torn")
                _write_durably(kept, torn)
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise translate_os_error(exc, f"cannot repair event log segment {path}") from exc
        return LogRepaired(segment=path.name, torn_bytes=len(torn), kept_in=kept.name, after_seq=after)


def _complete_prefix(f: BinaryIO, size: int) -> tuple[int, int]:
    """(length of the prefix of complete, decodable lines, seq of its last line).

    Only the end of the file is read: the last complete line and the one
    before it (in case the last is garbage a crash left, such as NULs). The
    window widens until both lines are whole, so a line is never decoded
    from its middle.
    """
    back = 8192
    while True:
        back = min(back, size)
        f.seek(size - back)
        data = f.read(back)
        base = size - back
        last_nl = data.rfind(b"\n")
        if last_nl < 0:
            if base == 0:
                return 0, 0  # not one complete line
            back *= 4
            continue
        start = data.rfind(b"\n", 0, last_nl) + 1
        before = data.rfind(b"\n", 0, start - 1) + 1 if start > 0 else 0
        if base > 0 and (start == 0 or before == 0):
            back *= 4
            continue
        break
    seq = _seq_of(data[start:last_nl])
    if seq is not None:
        return base + last_nl + 1, seq
    if start == 0:
        return 0, 0  # the only line is garbage
    # the last line is garbage: cut it if the one before is a record
    return base + start, _seq_of(data[before : start - 1]) or 0


def _seq_of(line: bytes) -> int | None:
    try:
        return decode_record(line).seq
    except msgspec.DecodeError:
        return None


def _write_durably(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
