"""Local users: who has a mailbox here.

The log is the truth (`user_created`, `user_deleted`); `DATA/users.json` is
its snapshot (`{"seq": N, "users": [...]}`), rewritten durably after each
change under the same flock as the change, so SMTP workers can answer "is
this a local user?" with a stat and, when it changed, one read.

Failure rules: a malformed address, a mailbox name with % ! @ " /, adding a
user twice or deleting one who does not exist raise SpoolError with one
line and change nothing. A users.json that does not parse is rebuilt from
the log (it is derived data).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import msgspec

from events import EventLog, read_records
from events import schema as ev
from events.errors import SpoolError
from spoolfs import durable
from spoolfs.addresses import parse_mailbox


class UserError(SpoolError):
    """A user command that cannot be carried out."""


class _Snapshot(msgspec.Struct):
    seq: int = 0
    users: list[str] = []


class Users:
    def __init__(self, data_dir: Path, local_domains: list[str]) -> None:
        self.path = Path(data_dir) / "users.json"
        self.lock_path = Path(data_dir) / "users.lock"
        self.events_dir = Path(data_dir) / "events"
        self.local_domains = {d.lower() for d in local_domains}
        self._mtime: float | None = None
        self._users: frozenset[str] = frozenset()

    # --- reading --------------------------------------------------------------

    def _load(self) -> None:
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except FileNotFoundError:
            mtime = None
        if mtime == self._mtime and mtime is not None:
            return
        snap = self._read_snapshot()
        self._users = frozenset(snap.users)
        self._mtime = mtime

    def _read_snapshot(self) -> _Snapshot:
        try:
            return msgspec.json.decode(self.path.read_bytes(), type=_Snapshot)
        except FileNotFoundError:
            return _Snapshot()
        except (msgspec.DecodeError, msgspec.ValidationError):
            return self._replay()

    def _replay(self) -> _Snapshot:
        users: set[str] = set()
        seq = 0
        for record in read_records(self.events_dir, types=["user_created", "user_deleted"]):
            p = record.payload
            if isinstance(p, ev.UserCreated):
                users.add(p.address)
            elif isinstance(p, ev.UserDeleted):
                users.discard(p.address)
            seq = record.seq
        return _Snapshot(seq=seq, users=sorted(users))

    def exists(self, address: str) -> bool:
        self._load()
        return canonical(address) in self._users

    def list(self) -> list[str]:
        self._load()
        return sorted(self._users)

    def maildir(self, data_dir: Path, address: str) -> Path:
        local, domain = canonical(address).split("@", 1)
        return Path(data_dir) / "mail" / domain / local / "Maildir"

    # --- changing -------------------------------------------------------------

    def add(self, log: EventLog, address: str, actor: str) -> str:
        address = self._check(address)
        return self._change(log, address, actor, create=True)

    def delete(self, log: EventLog, address: str, actor: str) -> str:
        address = canonical(address)
        return self._change(log, address, actor, create=False)

    def is_local(self, address: str) -> bool:
        return canonical(address).split("@", 1)[1] in self.local_domains

    def _check(self, address: str) -> str:
        address = canonical(address)
        local = address.split("@", 1)[0]
        if any(c in local for c in '%!@"/') or local.startswith("."):
            raise UserError(f'{address}: a mailbox name cannot contain % ! @ " / or start with a dot')
        return address

    def _change(self, log: EventLog, address: str, actor: str, *, create: bool) -> str:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            snap = self._read_snapshot()
            users = set(snap.users)
            if create and address in users:
                raise UserError(f"user {address} exists already")
            if not create and address not in users:
                raise UserError(f"no user {address}")
            event = ev.UserCreated(address=address) if create else ev.UserDeleted(address=address)
            record = log.append(event, actor)
            users.add(address) if create else users.discard(address)
            data = msgspec.json.encode(_Snapshot(seq=record.seq, users=sorted(users))) + b"\n"
            tmp = self.path.with_name("users.json.tmp")
            durable.unlink_quietly(tmp)
            durable.write_durably(tmp, self.path, data)
        finally:
            os.close(fd)
        return address


def canonical(address: str) -> str:
    """Users are matched case-insensitively, as mail admins expect."""
    local, domain = parse_mailbox(address)
    return f"{local.lower()}@{domain}"
