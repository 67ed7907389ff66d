"""A message's state (the sidecar) and how each event changes it.

The sidecar is a snapshot of one message as of event `seq`. It holds only
what events say, so replaying the log from zero with `apply` rebuilds
exactly what the sidecars on disk hold; `fsck` relies on that. "delivering"
is not stored: it is the live fact that a worker holds the message's claim.

Failure rules: `decode_sidecar` raises msgspec errors (the spool translates
them into a move to corrupt/); `apply` never fails on a known event, and
ignores events for messages it does not know (they were deleted before).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Literal

import msgspec

from events import schema as ev
from events.schema import Priority, Record

Status = Literal["waiting", "deferred", "held"]
RecipientStatus = Literal["pending", "delivered", "deferred", "failed"]
PRIORITY_RANK = {"high": 0, "normal": 1, "low": 2}


class RecipientState(msgspec.Struct, kw_only=True):
    address: str
    state: RecipientStatus = "pending"
    attempts: int = 0
    code: int = 0
    response: str = ""
    host: str = ""
    updated_at: dt.datetime | None = None


class Sidecar(msgspec.Struct, kw_only=True):
    id: str
    node: str
    subspool: str
    sender: str
    recipients: list[RecipientState]
    size: int
    received_at: dt.datetime
    priority: Priority = "normal"
    status: Status = "waiting"
    attempts: int = 0
    next_attempt_at: dt.datetime
    forced: bool = False
    source: str = "cli"
    client_ip: str = ""
    helo: str = ""
    session_id: str = ""
    bounce_of: str = ""
    warned: bool = False
    # accepted while a scanner was unavailable (scan.on_failure = "accept")
    unscanned: bool = False
    seq: int = 0

    @property
    def delivered(self) -> int:
        return sum(1 for r in self.recipients if r.state == "delivered")


_encoder = msgspec.json.Encoder(enc_hook=ev.enc_hook)
_decoder = msgspec.json.Decoder(Sidecar)


def encode_sidecar(sidecar: Sidecar) -> bytes:
    return _encoder.encode(sidecar) + b"\n"


def decode_sidecar(data: bytes) -> Sidecar:
    return _decoder.decode(data)


def apply(state: Sidecar | None, record: Record) -> Sidecar | None:
    """The state after `record` (None: the message has left the spool).

    Mutates and returns `state`; callers own the object they pass in.
    """
    e = record.payload
    if isinstance(e, ev.MessageEnqueued):
        return Sidecar(
            id=e.id,
            node=record.node,
            subspool=e.subspool,
            sender=e.sender,
            recipients=[RecipientState(address=a) for a in e.recipients],
            size=e.size,
            received_at=record.at,
            priority=e.priority,
            next_attempt_at=record.at,
            source=e.source,
            client_ip=e.client_ip,
            helo=e.helo,
            session_id=e.session_id,
            bounce_of=e.bounce_of,
            seq=record.seq,
        )
    if state is None:
        return None
    match e:
        case ev.PrioritySet(priority=priority):
            state.priority = priority
        case ev.MessageHeld():
            state.status = "held"
        case ev.MessageReleased():
            state.status = "deferred" if state.attempts else "waiting"
        case ev.MessageForced():
            state.next_attempt_at = record.at
            state.forced = True
        case ev.RetriesReset():
            state.attempts = 0
            state.next_attempt_at = record.at
            if state.status == "deferred":
                state.status = "waiting"
        case ev.DeliveryAttempted():
            for r in state.recipients:
                if r.address == e.recipient:
                    r.state = e.result
                    r.attempts += 1
                    r.code = e.code
                    r.response = e.response
                    r.host = e.host
                    r.updated_at = record.at
        case ev.MessageDeferred():
            state.attempts += 1
            state.next_attempt_at = e.next_attempt_at
            state.forced = False
            if state.status != "held":
                state.status = "deferred"
        case ev.DelayWarned():
            state.warned = True
        case ev.ScannerUnavailable():
            state.unscanned = True
        case ev.MessageDeleted() | ev.MovedToCorrupt() | ev.MessageFinished():
            return None
        case ev.SpoolRepaired(action="forgotten"):
            return None
        case _:
            return state
    state.seq = record.seq
    return state


def message_id_of(record: Record) -> str | None:
    return getattr(record.payload, "id", None)


class Replay(msgspec.Struct):
    """The spool as the log tells it."""

    states: dict[str, Sidecar]
    gone: set[str]  # messages the log says have left the spool
    last_seq: int = 0


def replay(records: Iterable[Record], into: Replay | None = None) -> Replay:
    result = into or Replay(states={}, gone=set())
    states, gone = result.states, result.gone
    for record in records:
        result.last_seq = record.seq
        mid = message_id_of(record)
        if mid is None:
            continue
        new = apply(states.get(mid), record)
        if new is None:
            if states.pop(mid, None) is not None or isinstance(record.payload, ev.MovedToCorrupt):
                gone.add(mid)
        else:
            states[mid] = new
            gone.discard(mid)
    return result
