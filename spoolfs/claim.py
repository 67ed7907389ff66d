"""Claims: who owns a message right now.

A worker owns a message while it holds an exclusive flock on the message's
.eml. The .eml is never rewritten, so its inode is stable for the life of
the message; the sidecar is replaced by rename on every change, so a lock
on it would be a lock on a file that is no longer there (DESIGN.md says
"sidecar"; this is why we lock the body instead). A dead process releases
its claims by dying.

Failure rules: a missing .eml is MessageNotFound; a claim not obtained
within `wait` seconds is MessageBusy ("being delivered").
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from spoolfs.durable import translate
from spoolfs.errors import MessageBusy, MessageNotFound


def take(eml: Path, message_id: str, *, wait: float = 2.0) -> int:
    """Take the claim on a message; returns the open descriptor of its .eml,
    which holds the claim until `release`d (or the process dies)."""
    try:
        fd = os.open(eml, os.O_RDONLY)
    except FileNotFoundError as exc:
        raise MessageNotFound(f"no message {message_id} in the spool") from exc
    except OSError as exc:
        raise translate(exc, f"cannot open {eml}") from exc
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise MessageBusy(f"message {message_id} is being delivered; try again") from None
                time.sleep(0.02)
        try:
            same = os.stat(eml).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # deleted or moved while we waited for the lock
            raise MessageNotFound(f"no message {message_id} in the spool")
    except BaseException:
        os.close(fd)
        raise
    return fd


def release(fd: int) -> None:
    """Give the claim up. When the message has left the spool this close frees
    its inode and blocks, which takes a while: callers in an event loop do it
    in a thread."""
    os.close(fd)


@contextmanager
def claim(eml: Path, message_id: str, *, wait: float = 2.0) -> Iterator[int]:
    """Hold the claim on a message; yields the open descriptor of its .eml."""
    fd = take(eml, message_id, wait=wait)
    try:
        yield fd
    finally:
        release(fd)


def is_claimed(eml: Path) -> bool:
    """True if some process holds the claim (the message is being delivered)."""
    try:
        fd = os.open(eml, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def claimed_in(directories: Iterable[Path]) -> set[str] | None:
    """The IDs of the claimed messages among the .eml files of `directories`.

    One read of /proc/locks and one listing per directory, instead of an
    open and a lock attempt per message (a second for 100,000 messages).
    A file whose inode holds an flock is then checked with `is_claimed`, so
    an inode number shared with another file system costs a check, never a
    wrong answer. None where /proc/locks cannot be read (not Linux): the
    caller asks `is_claimed` for each message.
    """
    try:
        with open("/proc/locks", "rb") as f:
            table = f.read()
    except OSError:
        return None
    inodes: set[int] = set()
    for line in table.splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:123456 0 EOF"; waiters have "->" after the number
        if len(fields) >= 6 and fields[1] == b"FLOCK" and fields[3] == b"WRITE":
            with contextlib.suppress(ValueError, IndexError):
                inodes.add(int(fields[5].rsplit(b":", 1)[1]))
    found: set[str] = set()
    if not inodes:
        return found
    for directory in directories:
        try:
            with os.scandir(directory) as entries:
                for e in entries:
                    if e.name.endswith(".eml") and e.inode() in inodes and is_claimed(Path(e.path)):
                        found.add(e.name[:-4])
        except FileNotFoundError:
            continue
    return found
