"""The vocabulary: every event type spoolfs records, and the log record.

Rules (msgspec's schema evolution):
- Every event is a frozen, keyword-only `msgspec.Struct` tagged by `type`.
- New fields are added only with defaults, so old records keep decoding.
- Unknown fields are ignored on decode (a newer writer may add some);
  an unknown `type` is an error, because a reader cannot apply it.
- A record line is the JSON encoding of `Record`, field order fixed:
  `{"prev":"<64 hex>","seq":N,"at":...,"actor":...,"node":...,"payload":{...}}`.
  `prev` is the SHA-256 (hex) of the previous record's line, without its
  newline; the first record's `prev` is 64 zeros.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal, get_args

import msgspec

GENESIS = "0" * 64

Priority = Literal["high", "normal", "low"]
AttemptResult = Literal["delivered", "deferred", "failed"]
Outcome = Literal["delivered", "bounced", "expired"]
QuarantineKind = Literal["spam", "virus"]
ScanFailureAction = Literal["tempfail", "accept"]


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Base of every event payload."""


# --- messages in the spool ---------------------------------------------------


class MessageEnqueued(Event, frozen=True, tag="message_enqueued"):
    id: str
    sender: str
    recipients: list[str]
    size: int
    subspool: str
    priority: Priority = "normal"
    source: str = "cli"
    client_ip: str = ""
    helo: str = ""
    session_id: str = ""
    # for a DSN: the message it reports on
    bounce_of: str = ""


class PrioritySet(Event, frozen=True, tag="priority_set"):
    id: str
    priority: Priority


class MessageHeld(Event, frozen=True, tag="message_held"):
    id: str


class MessageReleased(Event, frozen=True, tag="message_released"):
    id: str


class MessageForced(Event, frozen=True, tag="message_forced"):
    id: str


class RetriesReset(Event, frozen=True, tag="retries_reset"):
    id: str


class MessageDeleted(Event, frozen=True, tag="message_deleted"):
    id: str
    reason: str = ""


class MovedToCorrupt(Event, frozen=True, tag="moved_to_corrupt"):
    id: str
    reason: str
    files: list[str] = []


# --- delivery ----------------------------------------------------------------


class DeliveryAttempted(Event, frozen=True, tag="delivery_attempted"):
    id: str
    recipient: str
    result: AttemptResult
    code: int = 0
    response: str = ""
    host: str = ""


class MessageDeferred(Event, frozen=True, tag="message_deferred"):
    """A delivery round ended with recipients still pending."""

    id: str
    next_attempt_at: dt.datetime
    reason: str = ""


class MessageFinished(Event, frozen=True, tag="message_finished"):
    id: str
    outcome: Outcome
    # the DSN sent to the sender for failed recipients, if any
    dsn_id: str = ""


class DelayWarned(Event, frozen=True, tag="delay_warned"):
    """A delay warning DSN was sent to the sender (once a message)."""

    id: str
    dsn_id: str


# --- users and services ------------------------------------------------------


class UserCreated(Event, frozen=True, tag="user_created"):
    address: str


class UserDeleted(Event, frozen=True, tag="user_deleted"):
    address: str


class ServiceStarted(Event, frozen=True, tag="service_started"):
    """A service was asked to start (actor cli:...) or did start (actor system)."""

    name: str
    pid: int = 0


class ServiceStopped(Event, frozen=True, tag="service_stopped"):
    """A service was asked to stop (actor cli:...) or did stop (actor system)."""

    name: str
    pid: int = 0
    reason: str = ""


# --- scanning and quarantine -------------------------------------------------


class Verdict(msgspec.Struct, frozen=True, kw_only=True):
    """What the scanners said of one message (not an event: part of some).

    `checked` names the scanners that answered ("clamd", "spamd"); a
    scanner not configured, or skipped (a message over the spam size
    limit), is not in it.
    """

    virus: str = ""  # clamd's signature name; "" when none was found
    score: float = 0.0  # spamd's score
    threshold: float = 0.0  # the spam threshold the score was compared with
    rules: list[str] = []  # the spamd rules that matched
    checked: list[str] = []


class MessageQuarantined(Event, frozen=True, tag="message_quarantined"):
    """A scanned message was kept in quarantine/KIND/ instead of the spool.

    Its ID is a normal message ID; it never enters the spool under it.
    """

    id: str
    kind: QuarantineKind
    verdict: Verdict
    sender: str
    recipients: list[str]
    size: int
    remove_at: dt.datetime
    source: str = "smtp"
    client_ip: str = ""
    helo: str = ""
    session_id: str = ""


class QuarantineResent(Event, frozen=True, tag="quarantine_resent"):
    """A quarantined message went back to the spool as `new_id` (actor: who)."""

    id: str
    new_id: str
    kind: QuarantineKind = "spam"


class QuarantineDeleted(Event, frozen=True, tag="quarantine_deleted"):
    id: str
    kind: QuarantineKind
    reason: str = ""


class QuarantinePurged(Event, frozen=True, tag="quarantine_purged"):
    """A quarantined message reached its removal time and was removed."""

    id: str
    kind: QuarantineKind
    remove_at: dt.datetime


class ScannerUnavailable(Event, frozen=True, tag="scanner_unavailable"):
    """A scanner was down, timed out or answered nonsense during DATA.

    `action` "tempfail": the client got 451 4.7.1 and nothing was kept
    (`id` empty). "accept": the message `id` was spooled unscanned (its
    sidecar says `unscanned`).
    """

    scanners: list[str]
    reason: str
    action: ScanFailureAction
    id: str = ""
    client_ip: str = ""
    session_id: str = ""


# --- the log and the spool looking after themselves --------------------------


class LogRepaired(Event, frozen=True, tag="log_repaired"):
    segment: str
    torn_bytes: int
    kept_in: str
    after_seq: int


class SpoolRepaired(Event, frozen=True, tag="spool_repaired"):
    """One repair made by `spool fsck --repair`.

    `action` "forgotten" removes the message from the replayed state (its
    files had vanished); other actions only bring files back in line with
    the log and change no state.
    """

    id: str
    problem: str
    action: str
    path: str = ""


AnyEvent = (
    MessageEnqueued
    | PrioritySet
    | MessageHeld
    | MessageReleased
    | MessageForced
    | RetriesReset
    | MessageDeleted
    | MovedToCorrupt
    | DeliveryAttempted
    | MessageDeferred
    | MessageFinished
    | DelayWarned
    | UserCreated
    | UserDeleted
    | ServiceStarted
    | ServiceStopped
    | MessageQuarantined
    | QuarantineResent
    | QuarantineDeleted
    | QuarantinePurged
    | ScannerUnavailable
    | LogRepaired
    | SpoolRepaired
)

EVENT_TYPES: dict[str, type[Event]] = {
    cls.__struct_config__.tag: cls  # type: ignore[misc]
    for cls in get_args(AnyEvent)
}


class Record(msgspec.Struct, frozen=True):
    """One line of the log: the envelope every event travels in."""

    prev: str
    seq: int
    at: dt.datetime
    actor: str
    node: str
    payload: AnyEvent

    @property
    def type(self) -> str:
        return self.payload.__struct_config__.tag  # type: ignore[return-value]


def enc_hook(obj: object) -> object:
    """Encode datetime subclasses (freezegun's FakeDatetime) exactly as msgspec
    encodes a datetime: RFC 3339, microseconds only when non-zero, Z for UTC."""
    if isinstance(obj, dt.datetime):
        offset = obj.utcoffset()
        if offset is None:
            raise TypeError("naive datetimes are not recorded; use events.clock")
        text = (
            f"{obj.year:04d}-{obj.month:02d}-{obj.day:02d}T{obj.hour:02d}:{obj.minute:02d}:{obj.second:02d}"
        )
        if obj.microsecond:
            text += f".{obj.microsecond:06d}"
        minutes = int(offset.total_seconds()) // 60
        if minutes == 0:
            return text + "Z"
        sign = "+" if minutes > 0 else "-"
        return text + f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


_encoder = msgspec.json.Encoder(enc_hook=enc_hook)
_decoder = msgspec.json.Decoder(Record)


def encode_record(record: Record) -> bytes:
    """The canonical line for `record`, without the newline."""
    return _encoder.encode(record)


def decode_record(line: bytes) -> Record:
    """Decode one line; raises msgspec.DecodeError (callers translate it)."""
    return _decoder.decode(line)


def encode_event(event: Event) -> bytes:
    return _encoder.encode(event)
