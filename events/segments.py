"""Where the log lives on disk: segment files and reading their lines.

A segment is `NNNNNNNNNNNNNNNN.jsonl`, named by the seq of its first record,
so names sort in log order. Only complete lines (ending in a newline) are
records; bytes after the last newline are a torn tail that readers never
return and that the writer repairs (see `events.log`).

Failure rules: OSError while listing or reading is translated to LogError.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from events.errors import LogError

SUFFIX = ".jsonl"
NAME_DIGITS = 16
# Fixed offsets of the canonical line: {"prev":"<64 hex>","seq":N,...
PREV_START, PREV_END = 9, 73
SEQ_START = 81


def segment_name(first_seq: int) -> str:
    return f"{first_seq:0{NAME_DIGITS}d}{SUFFIX}"


def first_seq_of(path: Path) -> int:
    return int(path.name[: -len(SUFFIX)])


def list_segments(directory: Path) -> list[Path]:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise LogError(f"cannot list event log {directory}: {exc.strerror}") from exc
    return [directory / n for n in sorted(names) if n.endswith(SUFFIX) and n[: -len(SUFFIX)].isdigit()]


def line_seq(line: bytes) -> int:
    """The seq of a canonical line, without decoding it (ValueError if not canonical)."""
    return int(line[SEQ_START : line.index(b",", SEQ_START)])


def read_lines(path: Path, start: int = 0, chunk: int = 1 << 22) -> Iterator[tuple[int, bytes]]:
    """Yield (offset, line) for every complete line of `path` from byte `start`."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            offset = start
            rest = b""
            while True:
                block = f.read(chunk)
                if not block:
                    return
                block = rest + block
                lines = block.split(b"\n")
                rest = lines.pop()
                for line in lines:
                    yield offset, line
                    offset += len(line) + 1
    except FileNotFoundError:
        return
    except OSError as exc:
        raise LogError(f"cannot read event log segment {path}: {exc.strerror}") from exc


def last_lines(path: Path, count: int, chunk: int = 1 << 16) -> list[bytes]:
    """The last `count` complete lines of `path` (oldest first), read backwards."""
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            data = b""
            pos = end
            while pos > 0:
                step = min(chunk, pos)
                pos -= step
                f.seek(pos)
                data = f.read(step) + data
                if data.count(b"\n") > count:
                    break
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise LogError(f"cannot read event log segment {path}: {exc.strerror}") from exc
    complete = data[: data.rfind(b"\n") + 1] if b"\n" in data else b""
    lines = complete.split(b"\n")[:-1]
    if pos > 0:
        lines = lines[1:]  # the first piece may be a partial line
    return lines[-count:] if count else []
