"""Durable file writes: temporary name, fsync, rename, fsync directory.

Failure rules: ENOSPC/EDQUOT becomes StorageFull, any other OSError becomes
SpoolIOError; the temporary file is removed on failure, so nothing
half-written is ever left under a final name.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from spoolfs.errors import SpoolIOError, StorageFull

R = TypeVar("R")
T = TypeVar("T")


def translate(exc: OSError, what: str) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(f"{what}: disk full")
    return SpoolIOError(f"{what}: {exc.strerror or exc}")


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise translate(exc, f"cannot sync directory {path}") from exc


def write_synced(path: Path, data: bytes) -> None:
    """Create `path` (must not exist), write `data`, fsync; remove it on failure."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    except OSError as exc:
        raise translate(exc, f"cannot create {path}") from exc
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        unlink_quietly(path)
        raise translate(exc, f"cannot write {path}") from exc
    os.close(fd)


def create_claimed(path: Path, data: bytes) -> int:
    """Like write_synced, but keep the file open with an exclusive flock; return the fd."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    except OSError as exc:
        raise translate(exc, f"cannot create {path}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        unlink_quietly(path)
        raise translate(exc, f"cannot write {path}") from exc
    return fd


def publish(tmp: Path, final: Path, *, sync: bool = True) -> None:
    """Rename a synced temporary file to its final name and make the name durable."""
    try:
        os.rename(tmp, final)
    except OSError as exc:
        unlink_quietly(tmp)
        raise translate(exc, f"cannot rename {tmp} to {final}") from exc
    if sync:
        fsync_dir(final.parent)


def store_with_event(
    tmp: Path, final: Path, raw: bytes, append: Callable[[], R], finish: Callable[[R], T]
) -> T:
    """The body-then-event-then-sidecar sequence of the spool and the quarantine.

    The body goes to `tmp` (fsynced, and claimed with an flock held until
    the end, so fsck never takes a store in progress for crash debris); then
    `append()` makes the event durable; then the body is renamed to `final`
    and `finish(record)` writes the sidecar, whose directory fsync makes
    both names durable. If the event cannot be appended, the body goes.
    """
    fd = create_claimed(tmp, raw)
    try:
        try:
            record = append()
        except BaseException:
            unlink_quietly(tmp)
            raise
        publish(tmp, final, sync=False)
        return finish(record)
    finally:
        os.close(fd)


def write_durably(tmp: Path, final: Path, data: bytes) -> None:
    write_synced(tmp, data)
    publish(tmp, final)


def unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
