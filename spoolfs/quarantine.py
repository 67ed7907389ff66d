"""The quarantine: scanned mail kept for review instead of being sent.

    DATA/quarantine/spam/ID.eml    DATA/quarantine/spam/ID.json
    DATA/quarantine/virus/ID.eml   DATA/quarantine/virus/ID.json
    DATA/quarantine/tmp/           files being written

The same pair as the spool: the raw message, and a sidecar (msgspec) with
the envelope, the verdict, `quarantined_at` and `remove_at`. The sidecar
is a snapshot of the `message_quarantined` event, so it can always be
rebuilt from the log. The ID is a normal message ID (spoolfs.ids).

Failure rules:
- Adding: the body is written to tmp/ and fsynced, and held under an
  flock until the pair is published; the `message_quarantined` event is
  appended (durable); the body is renamed into quarantine/KIND/ (directory
  fsynced), then the sidecar is written the same way. Only then does
  `add` return (and SMTP answer 250). A crash before the event leaves a
  tmp/ file that `recover` removes (nothing was acknowledged); after it,
  `recover` finishes the pair from the log.
- Removing (delete, purge, resend): the entry is claimed (flock on its
  .eml, as in the spool), its sidecar unlinked and the directory fsynced,
  then the event appended, then the body unlinked. A crash before the
  event leaves a body without sidecar whose last event is still
  `message_quarantined`: `recover` writes the sidecar back (nothing
  happened). A crash after it leaves a body the log says is gone:
  `recover` removes it. Either way the files end as the log says.
- Resend re-enqueues through Spool.enqueue (source "resend") and removes
  the pair only after the new message is durable; `quarantine_resent`
  links both IDs. A crash between the enqueue and that event leaves both
  the new message and the entry: a second resend would send it twice
  (at least once, never lost). Virus entries are never resent; asking is
  refused before anything moves.
- Bad input (unknown kind, malformed or path-like ID, unknown ID, a virus
  ID given to resend) raises before anything changes; for a list of IDs,
  all are checked first.
- A sidecar that does not decode is reported (CorruptEntry) and left
  where it is; the purge skips it; only `delete` removes it.
- Retention: `remove_at` = quarantined_at + retention_days, at most 30
  days; the purge removes an entry at `remove_at`, and never keeps one
  more than 30 days whatever its sidecar says.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import get_args

import msgspec

from events import EventLog, clock, read_records
from events import schema as ev
from events.schema import QuarantineKind, Record, Verdict
from spoolfs import durable
from spoolfs.addresses import normalize, normalize_sender
from spoolfs.claim import claim
from spoolfs.config import MAX_RETENTION_DAYS, Config
from spoolfs.errors import InvalidAddress, MessageBusy, MessageNotFound, SpoolError
from spoolfs.ids import check_id, new_id
from spoolfs.layout import Layout
from spoolfs.spool import Spool

KINDS: tuple[QuarantineKind, ...] = get_args(QuarantineKind)
MAX_RETENTION = dt.timedelta(days=MAX_RETENTION_DAYS)
CHUNK = 128
TMP_AGE = 60.0  # seconds: a tmp/ file younger than this may be an add in progress


class QuarantineError(SpoolError):
    """Root of the quarantine's own refusals."""


class UnknownKind(QuarantineError):
    """Not a quarantine kind (spam, virus)."""


class NotInQuarantine(MessageNotFound):
    """No entry with that ID in that quarantine."""


class QuarantineBusy(QuarantineError):
    """Another process is resending or removing that entry right now."""


class ResendRefused(QuarantineError):
    """Virus mail is never resent."""


class CorruptEntry(QuarantineError):
    """A quarantine sidecar that does not decode (left in place)."""


class QuarantineEntry(msgspec.Struct, kw_only=True):
    id: str
    kind: QuarantineKind
    node: str
    sender: str
    recipients: list[str]
    size: int
    quarantined_at: dt.datetime
    remove_at: dt.datetime
    verdict: Verdict
    source: str = "smtp"
    client_ip: str = ""
    helo: str = ""
    session_id: str = ""
    seq: int = 0

    @property
    def expires_at(self) -> dt.datetime:
        """When the purge removes it: remove_at, and never past the 30-day cap."""
        return min(self.remove_at, self.quarantined_at + MAX_RETENTION)


_encoder = msgspec.json.Encoder(enc_hook=ev.enc_hook)
_decoder = msgspec.json.Decoder(QuarantineEntry)


def encode_entry(entry: QuarantineEntry) -> bytes:
    return _encoder.encode(entry) + b"\n"


def decode_entry(data: bytes) -> QuarantineEntry:
    return _decoder.decode(data)


def entry_from_record(record: Record) -> QuarantineEntry:
    """The sidecar that a `message_quarantined` record describes."""
    e = record.payload
    assert isinstance(e, ev.MessageQuarantined)
    return QuarantineEntry(
        id=e.id,
        kind=e.kind,
        node=record.node,
        sender=e.sender,
        recipients=list(e.recipients),
        size=e.size,
        quarantined_at=record.at,
        remove_at=e.remove_at,
        verdict=e.verdict,
        source=e.source,
        client_ip=e.client_ip,
        helo=e.helo,
        session_id=e.session_id,
        seq=record.seq,
    )


def check_kind(kind: str) -> QuarantineKind:
    if kind not in KINDS:
        shown = kind if len(kind) <= 40 else kind[:37] + "..."
        raise UnknownKind(f"unknown quarantine {shown!r}: the quarantines are {' and '.join(KINDS)}")
    return kind  # type: ignore[return-value]


_QUARANTINE_EVENTS = (
    ev.MessageQuarantined,
    ev.QuarantineDeleted,
    ev.QuarantinePurged,
    ev.QuarantineResent,
)
_QUARANTINE_TYPES = [str(cls.__struct_config__.tag) for cls in _QUARANTINE_EVENTS]


class Quarantine:
    def __init__(
        self, layout: Layout, log: EventLog, *, retention_days: int = MAX_RETENTION_DAYS, actor: str
    ) -> None:
        if not 1 <= retention_days <= MAX_RETENTION_DAYS:
            raise QuarantineError(f"retention must be 1 to {MAX_RETENTION_DAYS} days, not {retention_days}")
        self.layout = layout
        self.log = log
        self.retention = dt.timedelta(days=retention_days)
        self.actor = actor
        self.root = layout.quarantine
        self.tmp = self.root / "tmp"
        # bodies recover() found the log never heard of, with their mtimes:
        # judged once, not again (each judgement reads the whole log)
        self._strays: dict[str, tuple[float, ...]] = {}
        try:
            for d in (self.tmp, *(self.root / k for k in KINDS)):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise durable.translate(exc, f"cannot create the quarantine in {self.root}") from exc

    @classmethod
    def for_spool(cls, spool: Spool, config: Config) -> Quarantine:
        """The quarantine next to `spool`, sharing its log and its actor."""
        return cls(spool.layout, spool.log, retention_days=config.scan.retention_days, actor=spool.actor)

    # --- paths -------------------------------------------------------------------

    def eml(self, kind: QuarantineKind, message_id: str) -> Path:
        return self.root / kind / f"{message_id}.eml"

    def sidecar(self, kind: QuarantineKind, message_id: str) -> Path:
        return self.root / kind / f"{message_id}.json"

    # --- adding ------------------------------------------------------------------

    def add(
        self,
        raw: bytes,
        sender: str,
        recipients: Iterable[str],
        kind: QuarantineKind,
        verdict: Verdict,
        *,
        message_id: str | None = None,
        source: str = "smtp",
        client_ip: str = "",
        helo: str = "",
        session_id: str = "",
        actor: str | None = None,
    ) -> QuarantineEntry:
        """Keep a message durably in quarantine/KIND/; return its sidecar."""
        kind = check_kind(kind)
        sender = normalize_sender(sender)
        rcpts = list(dict.fromkeys(normalize(r) for r in recipients))
        if not rcpts:
            raise InvalidAddress("a message needs at least one recipient")
        mid = check_id(message_id) if message_id is not None else new_id()
        event = ev.MessageQuarantined(
            id=mid,
            kind=kind,
            verdict=verdict,
            sender=sender,
            recipients=rcpts,
            size=len(raw),
            remove_at=clock.now() + self.retention,
            source=source,
            client_ip=client_ip,
            helo=helo,
            session_id=session_id,
        )

        def finish(record: Record) -> QuarantineEntry:
            entry = entry_from_record(record)
            self._write_sidecar(entry)
            return entry

        entry = durable.store_with_event(
            self.tmp / f"{mid}.eml",
            self.eml(kind, mid),
            raw,
            lambda: self.log.append(event, actor or self.actor),
            finish,
        )
        return entry

    # --- reading -----------------------------------------------------------------

    def ids(self, kind: str) -> list[str]:
        """Every ID with a sidecar in quarantine/KIND/, oldest first."""
        kind = check_kind(kind)
        try:
            names = os.listdir(self.root / kind)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise durable.translate(exc, f"cannot list {self.root / kind}") from exc
        return sorted(n[:-5] for n in names if n.endswith(".json"))

    def get(self, kind: str, message_id: str) -> QuarantineEntry:
        kind = check_kind(kind)
        check_id(message_id)
        return self._read_sidecar(kind, message_id)

    def entries(
        self, kind: str, on_corrupt: Callable[[str, str], None] | None = None
    ) -> Iterator[QuarantineEntry]:
        """Every readable entry of quarantine/KIND/; corrupt sidecars are reported."""
        kind = check_kind(kind)
        for mid in self.ids(kind):
            try:
                yield self._read_sidecar(kind, mid)
            except NotInQuarantine:
                continue  # removed since the listing
            except CorruptEntry as exc:
                if on_corrupt is not None:
                    on_corrupt(mid, str(exc))

    def message_bytes(self, kind: str, message_id: str) -> bytes:
        kind = check_kind(kind)
        check_id(message_id)
        if not self.sidecar(kind, message_id).exists():
            raise NotInQuarantine(f"no message {message_id} in the {kind} quarantine")
        try:
            return self.eml(kind, message_id).read_bytes()
        except FileNotFoundError as exc:
            raise NotInQuarantine(f"no message {message_id} in the {kind} quarantine") from exc
        except OSError as exc:
            raise durable.translate(exc, f"cannot read quarantined message {message_id}") from exc

    def find(self, message_id: str) -> QuarantineKind | None:
        """Which quarantine holds `message_id`, if any."""
        check_id(message_id)
        for kind in KINDS:
            if self.sidecar(kind, message_id).exists():
                return kind
        return None

    def resolve(self, kind: str, ids: Iterable[str]) -> list[str]:
        """Check every ID (form, then existence) before anything is changed."""
        kind = check_kind(kind)
        checked = [check_id(i) for i in ids]
        for mid in checked:
            if not self.sidecar(kind, mid).exists():
                raise NotInQuarantine(f"no message {mid} in the {kind} quarantine")
        return list(dict.fromkeys(checked))

    # --- removing ----------------------------------------------------------------

    def delete(self, kind: str, ids: Iterable[str], reason: str = "") -> list[str]:
        """Remove entries (a `quarantine_deleted` event each); return their IDs.

        Corrupt sidecars are removed too: deleting is how an admin gets rid of them.
        """
        kind = check_kind(kind)
        return self._remove(
            kind,
            self.resolve(kind, ids),
            lambda mid, _entry: ev.QuarantineDeleted(id=mid, kind=kind, reason=reason),
            wait=2.0,
        )

    def delete_all(self, kind: str, reason: str = "") -> list[str]:
        return self.delete(kind, self.ids(kind), reason)

    def expired(self, now: dt.datetime | None = None) -> list[QuarantineEntry]:
        """Entries whose time is up, oldest first."""
        now = clock.now() if now is None else now
        return [e for kind in KINDS for e in self.entries(kind) if e.expires_at <= now]

    def purge(self, now: dt.datetime | None = None) -> list[QuarantineEntry]:
        """Remove the expired entries (a `quarantine_purged` event each); busy ones wait."""
        now = clock.now() if now is None else now
        done: list[QuarantineEntry] = []
        due = self.expired(now)
        for kind in KINDS:
            mine = {e.id: e for e in due if e.kind == kind}

            def purged(
                mid: str, entry: QuarantineEntry | None, kind: QuarantineKind = kind
            ) -> ev.Event | None:
                if entry is None or entry.expires_at > now:
                    return None  # corrupt now, or changed since the listing
                return ev.QuarantinePurged(id=mid, kind=kind, remove_at=entry.remove_at)

            removed = self._remove(kind, list(mine), purged, wait=0.0, skip_missing=True)
            done.extend(mine[mid] for mid in removed)
        return done

    def resend(self, spool: Spool, ids: Iterable[str], *, actor: str | None = None) -> list[tuple[str, str]]:
        """Put spam entries back in the spool for delivery; return (quarantine ID, new ID) pairs.

        Every ID is checked first: an unknown one, or one in the virus
        quarantine, refuses the whole request and nothing moves.
        """
        actor = actor or self.actor
        checked = list(dict.fromkeys(check_id(i) for i in ids))
        for mid in checked:
            kind = self.find(mid)
            if kind == "virus":
                raise ResendRefused(
                    f"message {mid} is in the virus quarantine: virus mail is never resent "
                    "(`spool quarantine delete virus ID` removes it); nothing was resent"
                )
            if kind is None:
                raise NotInQuarantine(f"no message {mid} in the spam quarantine; nothing was resent")
        done: list[tuple[str, str]] = []
        for mid in checked:
            with self._claim("spam", mid, wait=2.0):
                entry = self._read_sidecar("spam", mid)
                raw = self.message_bytes("spam", mid)
                new = spool.enqueue(raw, entry.sender, entry.recipients, source="resend", actor=actor)
                self._unlink(self.sidecar("spam", mid))
                durable.fsync_dir(self.root / "spam")
                self.log.append(ev.QuarantineResent(id=mid, new_id=new.id, kind="spam"), actor)
                self._unlink(self.eml("spam", mid))
                durable.fsync_dir(self.root / "spam")
            done.append((mid, new.id))
        return done

    def _remove(
        self,
        kind: QuarantineKind,
        ids: list[str],
        event_for: Callable[[str, QuarantineEntry | None], ev.Event | None],
        *,
        wait: float,
        skip_missing: bool = False,
    ) -> list[str]:
        """Claim each entry, unlink its sidecar, append its event, unlink its body (in chunks)."""
        removed: list[str] = []
        directory = self.root / kind
        for start in range(0, len(ids), CHUNK):
            with ExitStack() as stack:
                todo: list[tuple[str, ev.Event]] = []
                for mid in ids[start : start + CHUNK]:
                    try:
                        stack.enter_context(self._claim(kind, mid, wait=wait))
                    except (NotInQuarantine, QuarantineBusy):
                        if skip_missing:
                            continue
                        raise
                    try:
                        entry: QuarantineEntry | None = self._read_sidecar(kind, mid)
                    except CorruptEntry:
                        entry = None
                    except NotInQuarantine:
                        if skip_missing:
                            continue
                        raise
                    event = event_for(mid, entry)
                    if event is not None:
                        todo.append((mid, event))
                if not todo:
                    continue
                for mid, _ in todo:
                    self._unlink(self.sidecar(kind, mid))
                durable.fsync_dir(directory)
                self.log.append_many([e for _, e in todo], self.actor)
                for mid, _ in todo:
                    self._unlink(self.eml(kind, mid))
                durable.fsync_dir(directory)
                removed.extend(mid for mid, _ in todo)
        return removed

    # --- recovery ----------------------------------------------------------------

    def recover(self, *, tmp_age: float = TMP_AGE) -> list[tuple[str, str]]:
        """Finish or undo what a crash left half-done; return (ID, what was done).

        Looks at tmp/ and at bodies without sidecars, older than `tmp_age`
        seconds and not claimed by a live process; the log decides each one.
        A body the log never heard of is left alone, and not judged again
        until it changes.
        """
        now = time.time()
        candidates: dict[str, list[Path]] = {}
        for directory in (self.tmp, *(self.root / k for k in KINDS)):
            try:
                names = os.listdir(directory)
            except FileNotFoundError:
                continue
            for name in names:
                stem, _, ext = name.partition(".")
                if directory != self.tmp and (ext != "eml" or (directory / f"{stem}.json").exists()):
                    continue  # a complete pair
                candidates.setdefault(stem, []).append(directory / name)
        # Only then read the log, and only if something is left to judge: the
        # purge service calls this every few minutes, the log only grows.
        ready: dict[str, tuple[list[Path], tuple[float, ...]]] = {}
        for mid, paths in candidates.items():
            try:
                stamps = tuple(p.stat().st_mtime for p in paths)
            except FileNotFoundError:
                continue  # moving right now: next time
            if any(now - t < tmp_age for t in stamps) or self._strays.get(mid) == stamps:
                continue
            ready[mid] = (paths, stamps)
        if not ready:
            return []
        last = self._last_records(set(ready))
        done: list[tuple[str, str]] = []
        for mid, (paths, stamps) in sorted(ready.items()):
            action = self._recover_one(mid, paths, last.get(mid))
            if action:
                done.append((mid, action))
            elif mid not in last and all(p.parent != self.tmp for p in paths):
                self._strays[mid] = stamps
        return done

    def _recover_one(self, mid: str, paths: list[Path], record: Record | None) -> str:
        bodies = [p for p in paths if p.name.endswith(".eml")]
        body = bodies[0] if bodies else None
        with ExitStack() as stack:
            if body is not None:
                try:
                    fd = os.open(body, os.O_RDONLY)
                except FileNotFoundError:
                    return ""
                stack.callback(os.close, fd)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return ""  # an add or a removal in progress
                try:
                    if os.stat(body).st_ino != os.fstat(fd).st_ino:
                        return ""  # renamed or removed while we looked
                except FileNotFoundError:
                    return ""
            payload = record.payload if record is not None else None
            if isinstance(payload, ev.MessageQuarantined):
                assert record is not None
                final = self.eml(payload.kind, mid)
                if body is not None and body.parent == self.tmp:
                    durable.publish(body, final)
                if not final.exists():
                    for p in paths:
                        durable.unlink_quietly(p)
                    return "vanished: the log has it, its body is gone"
                durable.unlink_quietly(self.tmp / f"{mid}.json")  # a half-written sidecar
                self._write_sidecar(entry_from_record(record))
                return f"completed in {payload.kind}/"
            if payload is None and body is not None and body.parent != self.tmp:
                return ""  # a body the log never heard of: not ours to remove
            for p in paths:
                durable.unlink_quietly(p)
            for d in {p.parent for p in paths}:
                durable.fsync_dir(d)
            return "removed: never acknowledged" if payload is None else f"removed: {record.type}"  # type: ignore[union-attr]

    def _last_records(self, ids: set[str]) -> dict[str, Record]:
        last: dict[str, Record] = {}
        for record in read_records(self.layout.events, types=_QUARANTINE_TYPES):
            p = record.payload
            if isinstance(p, _QUARANTINE_EVENTS) and p.id in ids:
                last[p.id] = record
        return last

    # --- files -------------------------------------------------------------------

    @contextlib.contextmanager
    def _claim(self, kind: QuarantineKind, message_id: str, *, wait: float) -> Iterator[int]:
        """The spool's claim (flock on the body), in the quarantine's words."""
        try:
            with claim(self.eml(kind, message_id), message_id, wait=wait) as fd:
                yield fd
        except MessageNotFound as exc:
            raise NotInQuarantine(f"no message {message_id} in the {kind} quarantine") from exc
        except MessageBusy as exc:
            raise QuarantineBusy(
                f"message {message_id} in the {kind} quarantine is busy (being resent or removed); try again"
            ) from exc

    def _read_sidecar(self, kind: QuarantineKind, message_id: str) -> QuarantineEntry:
        path = self.sidecar(kind, message_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise NotInQuarantine(f"no message {message_id} in the {kind} quarantine") from exc
        except OSError as exc:
            raise durable.translate(exc, f"cannot read {path}") from exc
        try:
            entry = decode_entry(data)
            if entry.id != message_id or entry.kind != kind:
                raise msgspec.ValidationError(f"sidecar names {entry.kind} message {entry.id!r}")
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise CorruptEntry(f"quarantine sidecar {path} is corrupt ({exc}); left in place") from exc
        return entry

    def _write_sidecar(self, entry: QuarantineEntry) -> None:
        durable.write_durably(
            self.tmp / f"{entry.id}.json", self.sidecar(entry.kind, entry.id), encode_entry(entry)
        )

    @staticmethod
    def _unlink(path: Path) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise durable.translate(exc, f"cannot remove {path}") from exc


__all__ = [
    "KINDS",
    "CorruptEntry",
    "NotInQuarantine",
    "Quarantine",
    "QuarantineBusy",
    "QuarantineEntry",
    "QuarantineError",
    "ResendRefused",
    "UnknownKind",
    "check_kind",
    "decode_entry",
    "entry_from_record",
]
