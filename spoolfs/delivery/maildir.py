"""Local delivery into a Maildir (tmp/ new/ cur/), as Dovecot reads it.

Failure rules: every failure here is temporary; a local mailbox that cannot
be written today may be writable tomorrow, and nothing is dropped.
- disk full or quota exceeded (ENOSPC, EDQUOT): MailboxStorageFull, which is
  both a TemporaryFailure (452 4.3.1) and a StorageFull;
- any other OS error (permissions, a file where a directory should be, ...):
  TemporaryFailure (451 4.3.0), caused by the SpoolIOError from
  spoolfs.durable.translate.
A failed write leaves nothing in new/ (the file is written in tmp/, fsynced,
then renamed; a half-written tmp/ file is removed).
"""

from __future__ import annotations

import itertools
import os
import re
import time
from pathlib import Path

from spoolfs.delivery.results import MailboxStorageFull, TemporaryFailure
from spoolfs.durable import fsync_dir, publish, translate, write_synced
from spoolfs.errors import SpoolIOError, StorageFull

_LINE_ENDINGS = re.compile(rb"\r\n|\r|\n")
_counter = itertools.count(1)


def _escape_hostname(hostname: str) -> str:
    # Maildir: '/' and ':' cannot appear in the host part of a file name.
    return hostname.replace("/", r"\057").replace(":", r"\072")


def _prepare(data: bytes, sender: str, recipient: str) -> bytes:
    header = f"Return-Path: <{sender}>\nDelivered-To: {recipient}\n".encode()
    body = _LINE_ENDINGS.sub(b"\n", data)
    if body and not body.endswith(b"\n"):
        body += b"\n"
    return header + body


def _ensure_dirs(maildir: Path) -> None:
    wanted = [*reversed(maildir.parents), maildir, maildir / "tmp", maildir / "new", maildir / "cur"]
    try:
        created = [d for d in wanted if not d.is_dir()]
        for directory in created:
            directory.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise translate(exc, f"cannot create Maildir {maildir}") from exc
    # a new directory's name must survive a crash as well as the file in it
    for parent in dict.fromkeys(d.parent for d in created):
        fsync_dir(parent)


def deliver_maildir(maildir: Path, data: bytes, *, sender: str, recipient: str, hostname: str) -> Path:
    """Write `data` as a new message of `maildir` (DATA/mail/DOMAIN/USER/Maildir); return its path.

    Prepends Return-Path and Delivered-To, stores LF line endings, and makes
    the file durable (fsync the file, rename tmp/ -> new/, fsync new/).
    """
    try:
        _ensure_dirs(maildir)
        content = _prepare(data, sender, recipient)
        now = time.time()
        secs = int(now)
        usecs = int((now - secs) * 1_000_000)
        unique = f"{secs}.M{usecs}P{os.getpid()}Q{next(_counter)}.{_escape_hostname(hostname)}"
        name = f"{unique},S={len(content)}"
        tmp = maildir / "tmp" / name
        final = maildir / "new" / name
        write_synced(tmp, content)
        publish(tmp, final)
    except StorageFull as exc:
        raise MailboxStorageFull(452, f"452 4.3.1 cannot deliver to {maildir}: {exc}") from exc
    except SpoolIOError as exc:
        raise TemporaryFailure(451, f"451 4.3.0 cannot deliver to {maildir}: {exc}") from exc
    return final
