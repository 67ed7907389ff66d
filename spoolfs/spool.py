"""The spool on disk: enqueue, read and change messages.

Failure rules:
- Enqueue: the body is written to tmp/ and fsynced, the `message_enqueued`
  event is appended (durable), the body is renamed into its subspool, then
  the sidecar is written (fsynced) and renamed beside it, and the directory
  fsynced once for both names. Only then does enqueue return. A crash before the event leaves a tmp/ file
  that fsck removes (nothing was acknowledged); a crash after it leaves a
  message fsck completes from the log.
- Every change claims the message (flock on its .eml), appends its event,
  then rewrites the sidecar durably; a claimed message waits briefly, then
  MessageBusy. Deleting unlinks the sidecar before the body, so a sidecar
  never points at a missing body.
- Bad input (malformed or unknown ID, bad address) raises before anything
  is written. For a list of IDs, all are checked before any is changed.
- A sidecar that does not decode: the pair moves to spool/corrupt/, a
  `moved_to_corrupt` event records it, and the command goes on (listing)
  or says so (CorruptSidecar) for that one message. Never deleted.
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path

import msgspec

from events import EventLog
from events import schema as ev
from events.schema import Priority, Record
from spoolfs import durable
from spoolfs.addresses import normalize, normalize_sender
from spoolfs.claim import claim, is_claimed
from spoolfs.config import Config
from spoolfs.errors import CorruptSidecar, InvalidAddress, MessageNotFound, SpoolError
from spoolfs.ids import check_id, new_id
from spoolfs.layout import Layout
from spoolfs.state import Sidecar, apply, decode_sidecar, encode_sidecar

CHUNK = 128

# An operation looks at a message's state and says which event to append,
# or None when there is nothing to do (holding a held message).
Progress = Callable[[int], None] | None
Operation = Callable[[Sidecar], ev.Event | None]


def cli_actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"cli:{user}"


class Spool:
    def __init__(self, layout: Layout, log: EventLog, *, actor: str) -> None:
        self.layout = layout
        self.log = log
        self.actor = actor

    @classmethod
    def open(cls, config: Config, *, actor: str | None = None) -> Spool:
        layout = Layout(config.data_path, config.subspools)
        layout.create()
        log = EventLog(layout.events, node=config.node, segment_bytes=config.events.segment_bytes)
        return cls(layout, log, actor=actor or cli_actor())

    def close(self) -> None:
        self.log.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- enqueue ---------------------------------------------------------------

    def enqueue(
        self,
        raw: bytes,
        sender: str,
        recipients: Iterable[str],
        *,
        priority: Priority = "normal",
        source: str = "cli",
        client_ip: str = "",
        helo: str = "",
        session_id: str = "",
        actor: str | None = None,
        message_id: str | None = None,
        bounce_of: str = "",
    ) -> Sidecar:
        """Store a message durably and return its sidecar.

        `message_id` lets a caller name the message before it exists (the
        SMTP server puts it in the Received header); it must be new_id()'s.
        """
        sender = normalize_sender(sender)
        rcpts = [normalize(r) for r in recipients]
        if not rcpts:
            raise InvalidAddress("a message needs at least one recipient")
        rcpts = list(dict.fromkeys(rcpts))  # one delivery per recipient
        mid = check_id(message_id) if message_id is not None else new_id()
        nn = self.layout.subspool_of(mid)
        event = ev.MessageEnqueued(
            id=mid,
            sender=sender,
            recipients=rcpts,
            size=len(raw),
            subspool=nn,
            priority=priority,
            source=source,
            client_ip=client_ip,
            helo=helo,
            session_id=session_id,
            bounce_of=bounce_of,
        )

        def finish(record: Record) -> Sidecar:
            sidecar = apply(None, record)
            assert sidecar is not None
            self._write_sidecar(sidecar)
            return sidecar

        sidecar = durable.store_with_event(
            self.layout.tmp_eml(mid),
            self.layout.eml(mid),
            raw,
            lambda: self.log.append(event, actor or self.actor),
            finish,
        )
        return sidecar

    # --- reading ---------------------------------------------------------------

    def ids(self, subspools: Iterable[str] | None = None) -> list[str]:
        """Every message ID with a sidecar (in the given subspools), in ID (= time) order."""
        out: list[str] = []
        for nn in self.layout.subspool_names() if subspools is None else subspools:
            try:
                names = os.listdir(self.layout.spool / nn)
            except FileNotFoundError:
                continue
            out.extend(n[:-5] for n in names if n.endswith(".json"))
        out.sort()
        return out

    def get(self, message_id: str) -> Sidecar:
        check_id(message_id)
        return self._read_sidecar(message_id)

    def sidecars(
        self,
        on_corrupt: Callable[[str, str], None] | None = None,
        subspools: Iterable[str] | None = None,
    ) -> Iterator[Sidecar]:
        """Every readable sidecar; corrupt ones are moved aside and reported."""
        for mid in self.ids(subspools):
            try:
                yield self._read_sidecar(mid)
            except MessageNotFound:
                continue  # finished or deleted since the listing
            except CorruptSidecar as exc:
                if on_corrupt is not None:
                    on_corrupt(mid, str(exc))

    def message_bytes(self, message_id: str) -> bytes:
        check_id(message_id)
        try:
            return self.layout.eml(message_id).read_bytes()
        except FileNotFoundError as exc:
            raise MessageNotFound(f"no message {message_id} in the spool") from exc
        except OSError as exc:
            raise durable.translate(exc, f"cannot read message {message_id}") from exc

    def is_delivering(self, message_id: str) -> bool:
        return is_claimed(self.layout.eml(message_id))

    def resolve(self, ids: Iterable[str]) -> list[str]:
        """Check every ID (form, then existence) before anything is changed."""
        checked = [check_id(i) for i in ids]
        for mid in checked:
            if not self.layout.sidecar(mid).exists():
                raise MessageNotFound(f"no message {mid} in the spool")
        return list(dict.fromkeys(checked))

    # --- changes -----------------------------------------------------------------

    def set_priority(
        self, ids: Iterable[str], priority: Priority, progress: Progress = None
    ) -> list[Sidecar]:
        return self.change(
            ids,
            lambda s: None if s.priority == priority else ev.PrioritySet(id=s.id, priority=priority),
            progress=progress,
        )

    def hold(self, ids: Iterable[str], progress: Progress = None) -> list[Sidecar]:
        return self.change(
            ids, lambda s: None if s.status == "held" else ev.MessageHeld(id=s.id), progress=progress
        )

    def release(self, ids: Iterable[str], progress: Progress = None) -> list[Sidecar]:
        return self.change(
            ids, lambda s: ev.MessageReleased(id=s.id) if s.status == "held" else None, progress=progress
        )

    def force(self, ids: Iterable[str], progress: Progress = None) -> list[Sidecar]:
        return self.change(ids, lambda s: ev.MessageForced(id=s.id), progress=progress)

    def reset_retries(self, ids: Iterable[str], progress: Progress = None) -> list[Sidecar]:
        return self.change(ids, lambda s: ev.RetriesReset(id=s.id), progress=progress)

    def delete(self, ids: Iterable[str], reason: str = "", progress: Progress = None) -> list[Sidecar]:
        return self.change(ids, lambda s: ev.MessageDeleted(id=s.id, reason=reason), progress=progress)

    def change(
        self,
        ids: Iterable[str],
        operation: Operation,
        *,
        progress: Callable[[int], None] | None = None,
        wait: float = 2.0,
    ) -> list[Sidecar]:
        """Apply `operation` to each message; return the sidecars that changed.

        Messages are changed in chunks: claim each, append all their events
        with one fsync, then write their sidecars.
        """
        todo = self.resolve(ids)
        changed: list[Sidecar] = []
        for start in range(0, len(todo), CHUNK):
            chunk = todo[start : start + CHUNK]
            with ExitStack() as stack:
                states: list[Sidecar] = []
                events: list[ev.Event] = []
                for mid in chunk:
                    stack.enter_context(claim(self.layout.eml(mid), mid, wait=wait))
                    state = self._read_sidecar(mid)
                    event = operation(state)
                    if event is not None:
                        states.append(state)
                        events.append(event)
                records = self.log.append_many(events, self.actor) if events else []
                for state, record in zip(states, records, strict=True):
                    new = apply(state, record)
                    if new is None:
                        state.seq = record.seq  # the returned snapshot names its last event
                        self._remove_files(state.id)
                    else:
                        self._write_sidecar(new)
                    changed.append(state)
            if progress is not None:
                progress(len(chunk))
        return changed

    def record(self, state: Sidecar, events: list[ev.Event], actor: str | None = None) -> Sidecar | None:
        """Append events for a message the caller has claimed; update its files.

        One group commit for all of them; then the sidecar is rewritten, or,
        if the message left the spool, its files are removed.
        """
        if not events:
            return state
        records = self.log.append_many(events, actor or self.actor)
        current: Sidecar | None = state
        for record in records:
            current = apply(current, record)
            if current is None:
                break
        if current is None:
            self._remove_files(state.id)
        else:
            self._write_sidecar(current)
        return current

    def read_claimed(self, message_id: str) -> Sidecar:
        """The sidecar of a message the caller holds the claim on."""
        return self._read_sidecar(message_id)

    # --- files -------------------------------------------------------------------

    def _read_sidecar(self, message_id: str) -> Sidecar:
        path = self.layout.sidecar(message_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise MessageNotFound(f"no message {message_id} in the spool") from exc
        except OSError as exc:
            raise durable.translate(exc, f"cannot read {path}") from exc
        try:
            sidecar = decode_sidecar(data)
            if sidecar.id != message_id:
                raise msgspec.ValidationError(f"sidecar names message {sidecar.id!r}")
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.move_to_corrupt(message_id, f"sidecar does not parse: {exc}")
            raise CorruptSidecar(
                f"sidecar of {message_id} is corrupt ({exc}); moved to {self.layout.corrupt}"
            ) from exc
        return sidecar

    def _write_sidecar(self, sidecar: Sidecar) -> None:
        durable.write_durably(
            self.layout.tmp_sidecar(sidecar.id), self.layout.sidecar(sidecar.id), encode_sidecar(sidecar)
        )

    def _remove_files(self, message_id: str) -> None:
        sidecar, eml = self.layout.sidecar(message_id), self.layout.eml(message_id)
        for path in (sidecar, eml):  # sidecar first: it must never point at a missing body
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise durable.translate(exc, f"cannot remove {path}") from exc
        # No directory fsync (Postfix does none either): the event that made
        # the message leave is durable, and if a power cut brings the names
        # back, the recovery fsck at start removes them ("gone-but-present").

    def move_to_corrupt(self, message_id: str, reason: str, *, actor: str = "system") -> list[Path]:
        """Move whatever files a message has into spool/corrupt/ and record it."""
        moved: list[Path] = []
        dest_dir = self.layout.corrupt
        # body first, so that a crash half-way never leaves a sidecar without its body
        for path in (self.layout.eml(message_id), self.layout.sidecar(message_id)):
            if not path.exists():
                continue
            dest = dest_dir / path.name
            n = 1
            while dest.exists():
                dest = dest_dir / f"{path.name}.{n}"
                n += 1
            try:
                os.rename(path, dest)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise durable.translate(exc, f"cannot move {path} to {dest_dir}") from exc
            moved.append(dest)
        if moved:
            durable.fsync_dir(dest_dir)
            durable.fsync_dir(self.layout.spool / self.layout.subspool_of(message_id))
            self.log.append(
                ev.MovedToCorrupt(
                    id=message_id, reason=reason, files=[str(p.relative_to(self.layout.data)) for p in moved]
                ),
                actor,
            )
        return moved


__all__ = ["Spool", "SpoolError", "cli_actor"]
