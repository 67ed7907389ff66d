"""The delivery service against real receiving servers, with an injected clock.

Each test enqueues through the library, then drives `DeliveryService.attempt`
the way the running daemon does, with time frozen (freezegun) so retries,
backoff and expiry are exact. Receivers are Postfix's smtp-sink on loopback
addresses, found through dnsmasq MX records or a relayhost; local mail is
read back by a real Dovecot.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email
from pathlib import Path
from typing import Any

import flufl.bounce
import msgspec
import pytest
from freezegun import freeze_time
from peers import dnsmasq, dovecot, free_port, host_record, imap_count, mx_record, null_mx, smtp_sink

from events import read_records
from events.clock import now
from spoolfs.config import Config, load_config
from spoolfs.delivery.scheduler import Schedule
from spoolfs.delivery.service import DeliveryService
from spoolfs.spool import Spool
from spoolfs.users import Users

T0 = dt.datetime(2026, 11, 2, 9, 0, tzinfo=dt.UTC)
BODY = b"From: a@sender.test\r\nTo: x@remote.test\r\nSubject: test\r\n\r\nhello\r\n"


def configure(
    data: Path, *, delivery: dict[str, Any] | None = None, smtp: dict[str, Any] | None = None
) -> Config:
    config = load_config(data_dir=str(data))
    return msgspec.structs.replace(
        config,
        delivery=msgspec.structs.replace(config.delivery, timeout=5.0, **(delivery or {})),
        smtp=msgspec.structs.replace(config.smtp, **(smtp or {})),
    )


def attempt(service: DeliveryService, mid: str) -> None:
    asyncio.run(service.attempt(mid))


def story(spool: Spool, mid: str) -> list[str]:
    return [r.type for r in read_records(spool.layout.events) if getattr(r.payload, "id", None) == mid]


def bounces(spool: Spool, of: str) -> list[str]:
    return [s.id for s in spool.sidecars() if s.bounce_of == of]


@pytest.fixture
def relay(tmp_path: Path):
    """A spool and a service sending everything to one relayhost port."""
    port = free_port()
    config = configure(tmp_path / "data", delivery={"relayhost": f"127.0.0.1:{port}"})
    spool = Spool.open(config, actor="cli:test")
    yield config, spool, port
    spool.close()


def test_4xx_then_success_on_retry(relay: Any, tmp_path: Path) -> None:
    config, spool, port = relay
    with freeze_time(T0, real_asyncio=True) as clock:
        mid = spool.enqueue(BODY, "a@sender.test", ["x@remote.test"]).id
        service = DeliveryService(config, spool)
        with smtp_sink(port=port, reply_4xx=["RCPT"]):
            attempt(service, mid)
        s = spool.get(mid)
        assert (s.status, s.attempts, s.recipients[0].state, s.recipients[0].code) == (
            "deferred",
            1,
            "deferred",
            450,
        )
        assert s.next_attempt_at == T0 + dt.timedelta(seconds=config.delivery.min_backoff)
        dump = tmp_path / "ok.dump"
        with smtp_sink(port=port, dump_file=dump) as sink:
            attempt(service, mid)  # not due yet: nothing happens
            assert spool.get(mid).attempts == 1 and sink.messages() == []
            clock.tick(config.delivery.min_backoff + 1)
            attempt(service, mid)
            (got,) = sink.wait_for_messages(1)
        assert b"hello" in got
        assert not spool.layout.eml(mid).exists() and mid not in spool.ids()
        assert story(spool, mid) == [
            "message_enqueued",
            "delivery_attempted",
            "message_deferred",
            "delivery_attempted",
            "message_finished",
        ]


def test_backoff_doubles_to_the_maximum(relay: Any) -> None:
    config, spool, port = relay
    with freeze_time(T0, real_asyncio=True) as clock, smtp_sink(port=port, reply_4xx=["RCPT"]):
        mid = spool.enqueue(BODY, "a@sender.test", ["x@remote.test"]).id
        service = DeliveryService(config, spool)
        gaps = []
        for _ in range(6):
            attempt(service, mid)
            s = spool.get(mid)
            gaps.append((s.next_attempt_at - now()).total_seconds())
            clock.move_to(s.next_attempt_at)
    assert gaps == [300, 600, 1200, 2400, 4000, 4000]


def test_5xx_bounces_with_a_well_formed_dsn(relay: Any) -> None:
    config, spool, port = relay
    with freeze_time(T0, real_asyncio=True), smtp_sink(port=port, reply_5xx=["RCPT"]):
        mid = spool.enqueue(BODY, "a@sender.test", ["x@remote.test"]).id
        service = DeliveryService(config, spool)
        attempt(service, mid)
    assert story(spool, mid)[-1] == "message_finished"
    finished = [r for r in read_records(spool.layout.events) if r.type == "message_finished"][-1]
    assert finished.payload.outcome == "bounced"  # type: ignore[union-attr]
    (dsn_id,) = bounces(spool, mid)
    assert finished.payload.dsn_id == dsn_id  # type: ignore[union-attr]
    dsn_side = spool.get(dsn_id)
    assert dsn_side.sender == "" and [r.address for r in dsn_side.recipients] == ["a@sender.test"]
    msg = email.message_from_bytes(spool.message_bytes(dsn_id))
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = msg.get_payload()
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    blocks = parts[1].get_payload()
    assert "Reporting-MTA" in blocks[0]
    rcpt = blocks[1]
    assert rcpt["Final-Recipient"] == "rfc822; x@remote.test"
    assert rcpt["Action"] == "failed" and rcpt["Status"].startswith("5.")
    assert rcpt["Diagnostic-Code"].startswith("smtp; 5")
    assert "Subject: test" in parts[2].get_payload()
    assert flufl.bounce.scan_message(msg) == {b"x@remote.test"}


def test_no_bounce_to_the_null_sender(relay: Any) -> None:
    config, spool, port = relay
    with freeze_time(T0, real_asyncio=True), smtp_sink(port=port, reply_5xx=["RCPT"]):
        mid = spool.enqueue(BODY, "", ["x@remote.test"]).id
        DeliveryService(config, spool)
        attempt(DeliveryService(config, spool), mid)
    assert story(spool, mid)[-1] == "message_finished"
    assert spool.ids() == []  # finished, and no DSN was made


def test_queue_lifetime_expiry(tmp_path: Path) -> None:
    port = free_port()
    config = configure(tmp_path / "data", delivery={"relayhost": f"127.0.0.1:{port}", "lifetime": 3600.0})
    with Spool.open(config, actor="cli:test") as spool, freeze_time(T0, real_asyncio=True) as clock:
        mid = spool.enqueue(BODY, "a@sender.test", ["x@remote.test"]).id
        service = DeliveryService(config, spool)
        with smtp_sink(port=port, reply_4xx=["RCPT"]):
            attempt(service, mid)
            assert spool.get(mid).status == "deferred"
            clock.tick(3601)
            attempt(service, mid)
        finished = [r for r in read_records(spool.layout.events) if r.type == "message_finished"]
        assert [f.payload.outcome for f in finished] == ["expired"]  # type: ignore[union-attr]
        (dsn_id,) = bounces(spool, mid)
        report = email.message_from_bytes(spool.message_bytes(dsn_id)).get_payload()[1].get_payload()
        assert report[1]["Action"] == "failed" and "expired" in report[1]["Diagnostic-Code"]


def test_delay_warning_once(tmp_path: Path) -> None:
    port = free_port()
    config = configure(
        tmp_path / "data",
        delivery={
            "relayhost": f"127.0.0.1:{port}",
            "delay_warning": 600.0,
            "min_backoff": 400.0,
            "max_backoff": 400.0,
        },
    )
    with Spool.open(config, actor="cli:test") as spool, freeze_time(T0, real_asyncio=True) as clock:
        mid = spool.enqueue(BODY, "a@sender.test", ["x@remote.test"]).id
        service = DeliveryService(config, spool)
        with smtp_sink(port=port, reply_4xx=["RCPT"]):
            for _ in range(4):
                attempt(service, mid)
                clock.tick(401)
        warnings = bounces(spool, mid)
        assert len(warnings) == 1 and spool.get(mid).warned
        part = email.message_from_bytes(spool.message_bytes(warnings[0])).get_payload()[1].get_payload()
        assert part[1]["Action"] == "delayed"


def test_mx_preference_and_fallback(tmp_path: Path) -> None:
    port = free_port("127.0.0.3")
    records = [
        mx_record("pref.test", "mx1.pref.test", 10),
        mx_record("pref.test", "mx2.pref.test", 20),
        host_record("mx1.pref.test", "127.0.0.2"),  # nothing listens there
        host_record("mx2.pref.test", "127.0.0.3"),
        host_record("noemx.test", "127.0.0.3"),  # no MX: the A record is the implicit MX
        null_mx("nullmx.test"),
    ]
    dump = tmp_path / "mx.dump"
    with dnsmasq(records) as (host, dns_port), smtp_sink("127.0.0.3", port, dump_file=dump) as sink:
        config = configure(tmp_path / "data", delivery={"dns": f"{host}:{dns_port}", "smtp_port": port})
        with Spool.open(config, actor="cli:test") as spool:
            service = DeliveryService(config, spool)
            a = spool.enqueue(BODY, "a@sender.test", ["x@pref.test"]).id
            b = spool.enqueue(BODY, "a@sender.test", ["y@noemx.test"]).id
            c = spool.enqueue(BODY, "a@sender.test", ["z@nullmx.test"]).id
            d = spool.enqueue(BODY, "a@sender.test", ["w@nxdomain.test"]).id
            for mid in (a, b, c, d):
                attempt(service, mid)
            sink.wait_for_messages(2)
            attempts = {
                r.payload.recipient: r.payload  # type: ignore[union-attr]
                for r in read_records(spool.layout.events)
                if r.type == "delivery_attempted"
            }
    assert attempts["x@pref.test"].result == "delivered" and attempts["x@pref.test"].host == "127.0.0.3"
    assert attempts["y@noemx.test"].result == "delivered"
    assert attempts["z@nullmx.test"].result == "failed" and attempts["z@nullmx.test"].code == 556
    assert attempts["w@nxdomain.test"].result == "failed"


def test_outbound_hygiene_bare_lf_and_dots(relay: Any, tmp_path: Path) -> None:
    config, spool, port = relay
    body = b"Subject: lf\n\nline one\nline two\r.\nstill two\n.\n..dots\n"
    dump = tmp_path / "hyg.dump"
    with smtp_sink(port=port, dump_file=dump) as sink:
        mid = spool.enqueue(body, "a@sender.test", ["x@remote.test"]).id
        attempt(DeliveryService(config, spool), mid)
        (got,) = sink.wait_for_messages(1)
    # smtp-sink un-stuffs dots and writes LF; one message arrived, with every line intact
    text = got.split(b"\n\n", 1)[1]
    assert b"line one\nline two\n.\nstill two\n.\n..dots\n" in text
    assert story(spool, mid)[-1] == "message_finished"


def test_local_delivery_read_by_dovecot(tmp_path: Path) -> None:
    config = configure(tmp_path / "data", smtp={"local_domains": ["example.test"]})
    with Spool.open(config, actor="cli:test") as spool:
        users = Users(spool.layout.data, ["example.test"])
        users.add(spool.log, "alice@example.test", "cli:test")
        service = DeliveryService(config, spool)
        for i in range(3):
            mid = spool.enqueue(
                f"Subject: {i}\r\n\r\nhi\r\n".encode(), "a@sender.test", ["alice@example.test"]
            ).id
            attempt(service, mid)
        assert spool.ids() == []
        home = users.maildir(spool.layout.data, "alice@example.test").parent
        with dovecot(home, "alice") as imap:
            assert imap_count(imap.port, imap.user, imap.password) == 3


def test_unexpected_error_defers_and_records_it(relay: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    config, spool, _port = relay

    async def broken(*args: object, **kwargs: object) -> list[object]:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr("spoolfs.delivery.remote.deliver", broken)
    with freeze_time(T0, real_asyncio=True):
        mid = spool.enqueue(BODY, "a@sender.test", ["x@remote.test"]).id
        attempt(DeliveryService(config, spool), mid)
    s = spool.get(mid)
    assert s.status == "deferred" and "simulated bug" in s.recipients[0].response


def test_schedule_order_forced_then_priority_then_time() -> None:
    sched = Schedule()
    sched.upsert("late-high", priority=0, next_at=50.0, forced=False)
    sched.upsert("early-low", priority=2, next_at=10.0, forced=False)
    sched.upsert("early-normal", priority=1, next_at=20.0, forced=False)
    sched.upsert("future", priority=0, next_at=500.0, forced=False)
    sched.upsert("forced-low", priority=2, next_at=40.0, forced=True)
    order = []
    while (mid := sched.pop_due(100.0)) is not None:
        order.append(mid)
    assert order == ["forced-low", "late-high", "early-normal", "early-low"]
    assert sched.pop_due(100.0) is None and sched.next_due() == 500.0
    sched.remove("future")
    assert sched.pop_due(1000.0) is None


def test_an_enqueue_in_progress_is_tried_again_not_dropped(relay: Any, tmp_path: Path) -> None:
    """The delivery service follows the enqueue event before the body reaches its subspool."""
    config, spool, port = relay
    from events import schema as ev
    from spoolfs import durable
    from spoolfs.ids import new_id

    mid = new_id()
    fd = durable.create_claimed(spool.layout.tmp_eml(mid), BODY)  # as Spool.enqueue does, half-way
    try:
        spool.log.append(
            ev.MessageEnqueued(
                id=mid,
                sender="a@sender.test",
                recipients=["x@remote.test"],
                size=len(BODY),
                subspool=spool.layout.subspool_of(mid),
            ),
            "smtp",
        )
        service = DeliveryService(config, spool)
        attempt(service, mid)
        assert mid in service.schedule.entries  # not forgotten
    finally:
        import os

        os.close(fd)
    # the enqueue finishes (fsck does what the killed enqueue would have done), then it is delivered
    from spoolfs.fsck import fsck

    fsck(spool, repair=True, tmp_age=0)
    dump = tmp_path / "late.dump"
    with smtp_sink(port=port, dump_file=dump) as sink:
        attempt(service, mid)
        sink.wait_for_messages(1)
    assert story(spool, mid)[-1] == "message_finished"


def test_delivery_processes_share_the_spool_by_subspool(relay: Any) -> None:
    """Two shards see disjoint messages, together all of them, at start and in the log."""
    from events.reader import Cursor

    config, spool, _ = relay
    before = [spool.enqueue(BODY, "a@sender.test", ["x@remote.test"]).id for _ in range(30)]
    shards = [DeliveryService(config, spool, shard=(k, 2)) for k in range(2)]
    starts = [s.load() for s in shards]
    after = [spool.enqueue(BODY, "a@sender.test", ["x@remote.test"]).id for _ in range(30)]
    for service, start in zip(shards, starts, strict=True):
        service.follow(Cursor(start))
    mine = [set(s.schedule.entries) for s in shards]
    assert mine[0].isdisjoint(mine[1])
    assert mine[0] | mine[1] == set(before) | set(after)
    assert all(mine)  # both shards have work (30+30 messages over 16 subspools)
    for k, ids in enumerate(mine):
        assert {spool.layout.subspool_index(m) % 2 for m in ids} == {k}


def test_start_up_finds_an_enqueue_still_moving_its_files(relay: Any) -> None:
    """Events below the start seq are not followed: a message whose sidecar was not yet
    there when the worker looked must still be scheduled (the body is in tmp/ or alone
    in its subspool)."""
    import os

    from events import schema as ev
    from spoolfs import durable
    from spoolfs.ids import new_id

    config, spool, _ = relay
    in_tmp, alone = new_id(), new_id()
    fds = []
    for mid in (in_tmp, alone):
        fds.append(durable.create_claimed(spool.layout.tmp_eml(mid), BODY))
        spool.log.append(
            ev.MessageEnqueued(
                id=mid,
                sender="a@sender.test",
                recipients=["x@remote.test"],
                size=len(BODY),
                subspool=spool.layout.subspool_of(mid),
            ),
            "smtp",
        )
    os.rename(spool.layout.tmp_eml(alone), spool.layout.eml(alone))  # renamed, sidecar not yet written
    try:
        service = DeliveryService(config, spool)
        service.load()
        assert {in_tmp, alone} <= set(service.schedule.entries)
        # a shard sees only its own
        shards = [DeliveryService(config, spool, shard=(k, 2)) for k in range(2)]
        for s in shards:
            s.load()
        assert set(shards[0].schedule.entries) | set(shards[1].schedule.entries) == {in_tmp, alone}
        assert set(shards[0].schedule.entries).isdisjoint(shards[1].schedule.entries)
    finally:
        for fd in fds:
            os.close(fd)
