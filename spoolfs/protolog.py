"""Protocol logs: one file a day per service, lines `grep` and people read.

    DATA/log/smtp-2026-11-29.log
    2026-11-29T15:02:03.123456Z S01M8KX... 127.0.0.1:40312 connect

Every line carries the session (or message) ID, so `grep ID` tells a whole
story. Several processes append to the same file (O_APPEND). A line, or with
`flush_interval` a batch of whole lines, goes out in one write, which the
kernel does not interleave with another process's.

With `flush_interval` (the SMTP service: one write per batch instead of
about eight a message) lines wait in memory until the interval has passed,
until 64 KiB have gathered, or until `flush()` or `close()`. The timer
needs a running event loop; a line written where none runs (a thread) is
written at once, with whatever was waiting. After `close()` every line is
written at once.

Failure rules: logging never fails the work it describes; an OSError while
writing is counted and the lines dropped (the event log, not this file, is
the durable record). Buffered lines not yet written when the process is
killed (SIGKILL, a crash) are lost, at most `flush_interval` seconds of
them; a graceful stop (SIGTERM) closes the log, which writes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from datetime import datetime
from pathlib import Path

from events import clock

FLUSH_BYTES = 64 * 1024


class ProtocolLog:
    def __init__(self, directory: Path, name: str, *, flush_interval: float | None = None) -> None:
        self.directory = Path(directory)
        self.name = name
        self.flush_interval = flush_interval
        self._day = ""
        self._fd: int | None = None
        self.dropped = 0
        self._second = -1
        self._stamp = ""  # "YYYY-MM-DDTHH:MM:SS." of self._second
        self._lines: list[str] = []
        self._size = 0
        self._lock = threading.Lock()
        self._timer: asyncio.TimerHandle | None = None

    def _file(self, day: str) -> int:
        if day != self._day or self._fd is None:
            self._close_fd()
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.directory / f"{self.name}-{day}.log"
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            self._day = day
        return self._fd

    def _timestamp(self, now: datetime) -> str:
        # strftime costs more than the rest of a line; the seconds change rarely
        second = int(now.timestamp())
        if second != self._second:
            self._stamp = now.strftime("%Y-%m-%dT%H:%M:%S.")
            self._second = second
        return f"{self._stamp}{now.microsecond:06d}Z"

    def write(self, ref: str, text: str) -> None:
        if "\r" in text or "\n" in text:
            text = text.replace("\r", " ").replace("\n", " ")
        with self._lock:
            line = f"{self._timestamp(clock.now())} {ref} {text}\n"
            self._lines.append(line)
            self._size += len(line)
            if self.flush_interval is None or self._size >= FLUSH_BYTES:
                self._flush_locked()
                return
            if self._timer is not None:
                return
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self._flush_locked()
                return
            self._timer = loop.call_later(self.flush_interval, self.flush)

    def flush(self) -> None:
        """Write what is waiting, now."""
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        lines, self._lines, self._size = self._lines, [], 0
        # a batch can straddle midnight: each day's lines go to that day's file
        start = 0
        while start < len(lines):
            day = lines[start][:10]
            end = start + 1
            while end < len(lines) and lines[end][:10] == day:
                end += 1
            self._write_out(day, "".join(lines[start:end]).encode("utf-8", "replace"), end - start)
            start = end

    def _write_out(self, day: str, data: bytes, count: int) -> None:
        try:
            fd = self._file(day)
            while data:  # a short write (disk nearly full) goes on where it stopped
                written = os.write(fd, data)
                if written <= 0:
                    raise OSError("no progress writing the protocol log")
                data = data[written:]
        except OSError:
            self.dropped += count

    def close(self) -> None:
        """Write what is waiting and close the file; later lines are written at once."""
        with self._lock:
            self._flush_locked()
            self.flush_interval = None
            self._close_fd()

    def _close_fd(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
