"""Maildir delivery: the files on disk, read back by a real Dovecot; disk full on a tiny tmpfs."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from peers import dovecot, imap_count

from events.errors import StorageFull
from spoolfs.delivery.maildir import deliver_maildir
from spoolfs.delivery.results import MailboxStorageFull, TemporaryFailure

USER = "bob@example.test"
NAME_RE = re.compile(r"^(\d+)\.M(\d+)P(\d+)Q(\d+)\.(.+),S=(\d+)$")


def maildir_of(data: Path, domain: str = "example.test", user: str = "bob") -> Path:
    return data / "mail" / domain / user / "Maildir"


def message(n: int) -> bytes:
    return (
        f"From: a@example.org\r\nTo: {USER}\r\nSubject: number {n}\r\n\r\nline\r\nbare\rcr\n.dot\r\n".encode()
    )


def test_delivers_into_new_with_lf_and_envelope_headers(tmp_path: Path) -> None:
    maildir = maildir_of(tmp_path)
    path = deliver_maildir(
        maildir, message(1), sender="a@example.org", recipient=USER, hostname="mx.example.test"
    )
    assert path.parent == maildir / "new"
    assert {p.name for p in maildir.iterdir()} == {"tmp", "new", "cur"}
    assert list((maildir / "tmp").iterdir()) == []
    content = path.read_bytes()
    assert b"\r" not in content
    assert content == (
        b"Return-Path: <a@example.org>\n"
        b"Delivered-To: bob@example.test\n"
        b"From: a@example.org\nTo: bob@example.test\nSubject: number 1\n\nline\nbare\ncr\n.dot\n"
    )
    match = NAME_RE.match(path.name)
    assert match, path.name
    assert int(match.group(3)) == os.getpid()
    assert match.group(5) == "mx.example.test"
    assert int(match.group(6)) == len(content)


def test_null_sender_and_unique_names(tmp_path: Path) -> None:
    maildir = maildir_of(tmp_path)
    paths = [
        deliver_maildir(maildir, b"Subject: x\n\nbody", sender="", recipient=USER, hostname="mx")
        for _ in range(5)
    ]
    assert len({p.name for p in paths}) == 5
    assert paths[0].read_bytes().startswith(b"Return-Path: <>\nDelivered-To: bob@example.test\n")
    assert paths[0].read_bytes().endswith(b"body\n")


def test_hostname_slash_and_colon_are_escaped(tmp_path: Path) -> None:
    path = deliver_maildir(maildir_of(tmp_path), b"x", sender="", recipient=USER, hostname="a/b:c")
    assert ".a\\057b\\072c,S=" in path.name
    assert ":" not in path.name and path.name.count("/") == 0


def test_dovecot_sees_every_delivered_message(tmp_path: Path) -> None:
    home = tmp_path / "mail" / "example.test" / "bob"
    for n in range(3):
        deliver_maildir(home / "Maildir", message(n), sender="a@example.org", recipient=USER, hostname="mx")
    with dovecot(home, USER) as imap:
        assert imap_count(imap.port, imap.user, imap.password) == 3
        # EXAMINE changed nothing in the copy Dovecot serves, nor in ours
        assert imap_count(imap.port, imap.user, imap.password) == 3
    assert len(list((home / "Maildir" / "new").iterdir())) == 3


def test_a_file_where_the_maildir_should_be_is_temporary(tmp_path: Path) -> None:
    blocker = tmp_path / "mail"
    blocker.write_bytes(b"not a directory")
    with pytest.raises(TemporaryFailure) as info:
        deliver_maildir(maildir_of(tmp_path), b"x", sender="", recipient=USER, hostname="mx")
    assert info.value.code == 451
    assert info.value.response.startswith("451 4.3.0 ")


@contextlib.contextmanager
def tiny_disk(path: Path, size: str) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        check=False,
        capture_output=True,
        timeout=10,
    )
    if mounted.returncode != 0:
        message = f"cannot mount a tmpfs: {mounted.stderr.decode(errors='replace').strip()}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, timeout=10)


def test_disk_full_is_temporary_storage_full_and_leaves_nothing(tmp_path: Path) -> None:
    with tiny_disk(tmp_path / "disk", "256k") as disk:
        maildir = maildir_of(disk)
        first = deliver_maildir(
            maildir, b"Subject: small\n\nfits\n", sender="", recipient=USER, hostname="mx"
        )
        big = b"Subject: big\n\n" + b"x" * 1023 + b"\n"
        with pytest.raises(MailboxStorageFull) as info:
            deliver_maildir(maildir, big * 512, sender="", recipient=USER, hostname="mx")
        assert isinstance(info.value, TemporaryFailure)
        assert isinstance(info.value, StorageFull)
        assert info.value.temporary
        assert info.value.code == 452
        assert info.value.response.startswith("452 4.3.1 ")
        assert list((maildir / "new").iterdir()) == [first]
        assert list((maildir / "tmp").iterdir()) == []
