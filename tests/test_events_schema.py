"""The vocabulary: every event type round-trips, old and newer lines decode, the line is canonical."""

from __future__ import annotations

import datetime as dt
import hashlib
import json

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from events.schema import (
    EVENT_TYPES,
    GENESIS,
    DelayWarned,
    DeliveryAttempted,
    Event,
    LogRepaired,
    MessageDeferred,
    MessageDeleted,
    MessageEnqueued,
    MessageFinished,
    MessageForced,
    MessageHeld,
    MessageQuarantined,
    MessageReleased,
    MovedToCorrupt,
    PrioritySet,
    QuarantineDeleted,
    QuarantinePurged,
    QuarantineResent,
    Record,
    RetriesReset,
    ScannerUnavailable,
    ServiceStarted,
    ServiceStopped,
    SpoolRepaired,
    UserCreated,
    UserDeleted,
    Verdict,
    decode_record,
    encode_event,
    encode_record,
)
from events.segments import PREV_END, PREV_START, line_seq

UTC = dt.UTC
AT = dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)

# One sample per event type; every field with a default is given a NON-default
# value, so a round trip that silently fell back to a default would be caught.
SAMPLES: dict[str, Event] = {
    "message_enqueued": MessageEnqueued(
        id="01HXAMPLE0000000000000000A",
        sender="alice@example.org",
        recipients=["bob@example.net", "carol@example.com"],
        size=12345,
        subspool="07",
        priority="high",
        source="smtp",
        client_ip="192.0.2.10",
        helo="mx.example.org",
        session_id="sess-42",
        bounce_of="01HXAMPLE0000000000000000Z",
    ),
    "priority_set": PrioritySet(id="m1", priority="low"),
    "message_held": MessageHeld(id="m2"),
    "message_released": MessageReleased(id="m3"),
    "message_forced": MessageForced(id="m4"),
    "retries_reset": RetriesReset(id="m5"),
    "message_deleted": MessageDeleted(id="m6", reason="cli:root asked"),
    "moved_to_corrupt": MovedToCorrupt(
        id="m7", reason="sidecar unreadable", files=["07/m7.eml", "07/m7.json"]
    ),
    "delivery_attempted": DeliveryAttempted(
        id="m8",
        recipient="bob@example.net",
        result="deferred",
        code=451,
        response="4.7.1 try again later",
        host="mx.example.net",
    ),
    "message_deferred": MessageDeferred(
        id="m9",
        next_attempt_at=dt.datetime(2024, 5, 6, 8, 0, 0, 500, tzinfo=UTC),
        reason="451 from mx.example.net",
    ),
    "message_finished": MessageFinished(id="m10", outcome="bounced", dsn_id="dsn-10"),
    "delay_warned": DelayWarned(id="m12", dsn_id="dsn-12"),
    "user_created": UserCreated(address="dave@example.org"),
    "user_deleted": UserDeleted(address="erin@example.org"),
    "service_started": ServiceStarted(name="smtp", pid=4242),
    "service_stopped": ServiceStopped(name="delivery", pid=4243, reason="cli:root asked"),
    "message_quarantined": MessageQuarantined(
        id="01HXAMPLE0000000000000000Q",
        kind="virus",
        verdict=Verdict(
            virus="Eicar-Test-Signature",
            score=6.5,
            threshold=5.0,
            rules=["MISSING_DATE", "NO_RELAYS"],
            checked=["clamd", "spamd"],
        ),
        sender="alice@example.org",
        recipients=["bob@example.net"],
        size=2048,
        remove_at=dt.datetime(2024, 6, 5, 7, 8, 9, tzinfo=UTC),
        source="pickup",
        client_ip="192.0.2.11",
        helo="client.example.org",
        session_id="S0123456789AB",
    ),
    "quarantine_resent": QuarantineResent(
        id="01HXAMPLE0000000000000000Q", new_id="01HXAMPLE0000000000000000R", kind="virus"
    ),
    "quarantine_deleted": QuarantineDeleted(id="m13", kind="spam", reason="cli:root asked"),
    "quarantine_purged": QuarantinePurged(
        id="m14", kind="virus", remove_at=dt.datetime(2024, 6, 5, 7, 8, 9, 250, tzinfo=UTC)
    ),
    "scanner_unavailable": ScannerUnavailable(
        scanners=["clamd", "spamd"],
        reason="clamd: connection refused; spamd: timed out after 30 s",
        action="accept",
        id="m15",
        client_ip="192.0.2.12",
        session_id="S0123456789AC",
    ),
    "log_repaired": LogRepaired(
        segment="0000000000000001.jsonl",
        torn_bytes=17,
        kept_in="0000000000000001.jsonl.9.torn",
        after_seq=9,
    ),
    "spool_repaired": SpoolRepaired(id="m11", problem="missing_eml", action="forgotten", path="07/m11.json"),
}


def _record(payload: Event, seq: int = 7) -> Record:
    return Record(prev="ab" * 32, seq=seq, at=AT, actor="cli:root", node="node-1", payload=payload)  # type: ignore[arg-type]


def _defaulted_fields(cls: type[Event]) -> list[msgspec.structs.FieldInfo]:
    return [f for f in msgspec.structs.fields(cls) if not f.required]


def _default_of(field: msgspec.structs.FieldInfo) -> object:
    if field.default_factory is not msgspec.NODEFAULT:
        return field.default_factory()
    return field.default


# --- round trip ----------------------------------------------------------------


def test_every_event_type_has_a_sample() -> None:
    """A new event type added to the union without a sample here fails this test."""
    assert set(SAMPLES) == set(EVENT_TYPES)
    for tag, sample in SAMPLES.items():
        assert type(sample) is EVENT_TYPES[tag]


def test_samples_use_non_default_values() -> None:
    for tag, sample in SAMPLES.items():
        for field in _defaulted_fields(type(sample)):
            assert getattr(sample, field.name) != _default_of(field), (tag, field.name)


@pytest.mark.parametrize("tag", sorted(SAMPLES))
def test_record_round_trip(tag: str) -> None:
    record = _record(SAMPLES[tag])
    line = encode_record(record)
    assert b"\n" not in line
    decoded = decode_record(line)
    assert decoded == record
    assert type(decoded.payload) is EVENT_TYPES[tag]
    assert decoded.type == tag
    assert decoded.at == AT
    assert decoded.at.utcoffset() == dt.timedelta(0)
    # canonical: re-encoding the decoded record gives the very same bytes (the chain hashes them)
    assert encode_record(decoded) == line
    # the JSON itself: fixed key order, tag inside the payload
    obj = json.loads(line)
    assert list(obj) == ["prev", "seq", "at", "actor", "node", "payload"]
    assert obj["payload"]["type"] == tag
    assert obj["at"] == "2024-05-06T07:08:09.123456Z"


@pytest.mark.parametrize("tag", sorted(SAMPLES))
def test_canonical_line_has_fixed_offsets(tag: str) -> None:
    """verify and the readers slice prev and seq out of the line at fixed offsets."""
    prev = hashlib.sha256(tag.encode()).hexdigest()
    for seq in (1, 9, 10, 12345, 2**40):
        line = encode_record(Record(prev=prev, seq=seq, at=AT, actor="a", node="n", payload=SAMPLES[tag]))  # type: ignore[arg-type]
        assert line[PREV_START:PREV_END] == prev.encode()
        assert line_seq(line) == seq


def test_encode_event_is_the_payload_of_the_record() -> None:
    for tag, sample in SAMPLES.items():
        payload = json.loads(encode_record(_record(sample)))["payload"]
        assert json.loads(encode_event(sample)) == payload, tag


def test_genesis_is_64_zeros() -> None:
    assert GENESIS == "0" * 64


@settings(max_examples=60, deadline=None)
@given(
    sender=st.text(max_size=40),
    recipients=st.lists(st.text(max_size=30), max_size=4),
    size=st.integers(min_value=0, max_value=2**53),
    actor=st.text(max_size=20),
    seq=st.integers(min_value=1, max_value=2**53),
    micros=st.integers(min_value=0, max_value=999_999),
)
def test_arbitrary_text_round_trips_and_stays_one_line(
    sender: str, recipients: list[str], size: int, actor: str, seq: int, micros: int
) -> None:
    event = MessageEnqueued(id="x", sender=sender, recipients=recipients, size=size, subspool="00")
    at = AT.replace(microsecond=micros)
    record = Record(prev=GENESIS, seq=seq, at=at, actor=actor, node="n", payload=event)  # type: ignore[arg-type]
    line = encode_record(record)
    assert b"\n" not in line  # a record is always exactly one line
    assert decode_record(line) == record
    assert line_seq(line) == seq


# --- schema evolution --------------------------------------------------------------


def _line_dict(payload: Event) -> dict[str, object]:
    return json.loads(encode_record(_record(payload)))


DEFAULTED = [(tag, f.name) for tag in sorted(SAMPLES) for f in _defaulted_fields(EVENT_TYPES[tag])]


def test_there_are_defaulted_fields_to_test() -> None:
    assert ("message_enqueued", "priority") in DEFAULTED
    assert ("moved_to_corrupt", "files") in DEFAULTED


@pytest.mark.parametrize(("tag", "field_name"), DEFAULTED)
def test_line_written_before_a_field_existed_decodes_with_default(tag: str, field_name: str) -> None:
    obj = _line_dict(SAMPLES[tag])
    payload = obj["payload"]
    assert isinstance(payload, dict)
    del payload[field_name]
    old_line = json.dumps(obj, separators=(",", ":")).encode()
    decoded = decode_record(old_line)
    field = next(f for f in msgspec.structs.fields(EVENT_TYPES[tag]) if f.name == field_name)
    assert getattr(decoded.payload, field_name) == _default_of(field)
    # every other field kept its value
    for other in msgspec.structs.fields(EVENT_TYPES[tag]):
        if other.name != field_name:
            assert getattr(decoded.payload, other.name) == getattr(SAMPLES[tag], other.name)


def test_old_message_enqueued_without_any_optional_field() -> None:
    line = (
        b'{"prev":"' + GENESIS.encode() + b'","seq":1,"at":"2023-01-01T00:00:00Z","actor":"smtp",'
        b'"node":"n1","payload":{"type":"message_enqueued","id":"m","sender":"a@b","recipients":["c@d"],'
        b'"size":10,"subspool":"00"}}'
    )
    record = decode_record(line)
    assert record.payload == MessageEnqueued(id="m", sender="a@b", recipients=["c@d"], size=10, subspool="00")
    payload = record.payload
    assert isinstance(payload, MessageEnqueued)
    assert (payload.priority, payload.source, payload.client_ip, payload.helo, payload.session_id) == (
        "normal",
        "cli",
        "",
        "",
        "",
    )
    assert record.at == dt.datetime(2023, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("tag", sorted(SAMPLES))
def test_unknown_fields_from_a_newer_writer_are_ignored(tag: str) -> None:
    record = _record(SAMPLES[tag])
    obj = _line_dict(SAMPLES[tag])
    payload = obj["payload"]
    assert isinstance(payload, dict)
    payload["added_in_v2"] = {"nested": [1, 2, 3]}
    obj["trace_id"] = "abc"
    obj["signature"] = None
    newer_line = json.dumps(obj, separators=(",", ":")).encode()
    assert decode_record(newer_line) == record


@pytest.mark.parametrize("unknown_type", ["message_teleported", "", "MESSAGE_HELD"])
def test_unknown_event_type_is_an_error(unknown_type: str) -> None:
    obj = _line_dict(MessageHeld(id="m"))
    payload = obj["payload"]
    assert isinstance(payload, dict)
    payload["type"] = unknown_type
    line = json.dumps(obj, separators=(",", ":")).encode()
    with pytest.raises(msgspec.ValidationError):
        decode_record(line)
    # and it is a DecodeError, which is what the log and readers catch
    with pytest.raises(msgspec.DecodeError):
        decode_record(line)


def test_payload_without_type_is_an_error() -> None:
    obj = _line_dict(MessageHeld(id="m"))
    payload = obj["payload"]
    assert isinstance(payload, dict)
    del payload["type"]
    with pytest.raises(msgspec.ValidationError):
        decode_record(json.dumps(obj).encode())


@pytest.mark.parametrize(
    ("tag", "field_name", "bad"),
    [
        ("message_enqueued", "priority", "urgent"),
        ("message_finished", "outcome", "lost"),
        ("delivery_attempted", "result", "maybe"),
        ("message_enqueued", "size", "ten"),
    ],
)
def test_invalid_field_values_are_rejected(tag: str, field_name: str, bad: object) -> None:
    obj = _line_dict(SAMPLES[tag])
    payload = obj["payload"]
    assert isinstance(payload, dict)
    payload[field_name] = bad
    with pytest.raises(msgspec.ValidationError):
        decode_record(json.dumps(obj).encode())


@pytest.mark.parametrize("tag", sorted(SAMPLES))
def test_missing_required_field_is_an_error(tag: str) -> None:
    required = [f.name for f in msgspec.structs.fields(EVENT_TYPES[tag]) if f.required]
    assert required
    obj = _line_dict(SAMPLES[tag])
    payload = obj["payload"]
    assert isinstance(payload, dict)
    del payload[required[0]]
    with pytest.raises(msgspec.ValidationError):
        decode_record(json.dumps(obj).encode())


@pytest.mark.parametrize("missing", ["prev", "seq", "at", "actor", "node", "payload"])
def test_record_fields_are_required(missing: str) -> None:
    obj = _line_dict(MessageHeld(id="m"))
    del obj[missing]
    with pytest.raises(msgspec.ValidationError):
        decode_record(json.dumps(obj).encode())


def test_garbage_is_a_decode_error() -> None:
    for garbage in (b"", b"\x00" * 40, b'{"prev":"00', b"not json"):
        with pytest.raises(msgspec.DecodeError):
            decode_record(garbage)


def test_events_are_frozen() -> None:
    event = MessageHeld(id="m")
    with pytest.raises(AttributeError):
        event.id = "other"  # type: ignore[misc]
