"""Protocol logs: one file a day per service, lines `grep` and people read.

    DATA/log/smtp-2026-11-29.log
    2026-11-29T15:02:03.123456Z S01M8KX... 127.0.0.1:40312 connect

Every line carries the session (or message) ID, so `grep ID` tells a whole
story. Several processes append to the same file: each line is one
O_APPEND write, which the kernel does not interleave.

Failure rules: logging never fails the work it describes; an OSError while
writing is counted and the line dropped (the event log, not this file, is
the durable record).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from events import clock


class ProtocolLog:
    def __init__(self, directory: Path, name: str) -> None:
        self.directory = Path(directory)
        self.name = name
        self._day = ""
        self._fd: int | None = None
        self.dropped = 0

    def _file(self, day: str) -> int:
        if day != self._day or self._fd is None:
            self.close()
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.directory / f"{self.name}-{day}.log"
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            self._day = day
        return self._fd

    def write(self, ref: str, text: str) -> None:
        now = clock.now()
        stamp = now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        line = f"{stamp} {ref} {text.replace(chr(13), ' ').replace(chr(10), ' ')}\n"
        try:
            os.write(self._file(stamp[:10]), line.encode("utf-8", "replace"))
        except OSError:
            self.dropped += 1

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
