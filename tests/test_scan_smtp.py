"""Scanning during DATA: our SMTP server on an ephemeral port, real clamd and
spamd, real clients. What is checked is what was stored (spool, quarantine,
events), not only the replies."""

from __future__ import annotations

import datetime as dt
import smtplib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from peers import SIGNATURES, Clamd, Spamd, clamd, eicar, free_port, gtube, spamd
from smtp_fixture import Running, smtp_server
from test_scan import HAM, plain, with_attachment

from events import read_records
from events import schema as ev
from spoolfs.config import ScanConfig
from spoolfs.fsck import fsck
from spoolfs.quarantine import Quarantine, decode_entry
from spoolfs.state import decode_sidecar
from spoolfs.users import Users

LOCAL = "example.test"
VIRUS = "Spoolfs.Test.EICAR.UNOFFICIAL"


@pytest.fixture(scope="module")
def clamd_peer() -> Iterator[Clamd]:
    with clamd(SIGNATURES) as peer:
        yield peer


@pytest.fixture(scope="module")
def spamd_peer() -> Iterator[Spamd]:
    with spamd() as peer:
        yield peer


def scanning(srv: Running, clamd_address: str, spamd_address: str, **scan: object) -> None:
    """Turn scanning on in the running server (a reload, as SIGHUP does)."""
    config = msgspec.structs.replace(
        srv.config,
        scan=ScanConfig(enabled=True, clamd=clamd_address, spamd=spamd_address, timeout=60.0, **scan),  # type: ignore[arg-type]
    )
    srv.server.reload(config)
    srv.config = config


@pytest.fixture
def srv(tmp_path: Path, clamd_peer: Clamd, spamd_peer: Spamd) -> Iterator[Running]:
    with smtp_server(tmp_path / "data", mynetworks=["127.0.0.0/8"], local_domains=[LOCAL]) as running:
        Users(running.spool.layout.data, [LOCAL]).add(running.spool.log, f"bob@{LOCAL}", "cli:test")
        scanning(running, clamd_peer.address, spamd_peer.address)
        yield running


def send(port: int, body: bytes, rcpt: str = "x@remote.test", source: str = "127.0.0.1") -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", port, timeout=90, source_address=(source, 0)) as client:
        client.ehlo("client.example")
        client.mail("alice@example.org")
        code, _ = client.rcpt(rcpt)
        assert code == 250
        code, msg = client.data(body)
    return code, msg.decode()


def queued_id(reply: str) -> str:
    return reply.rsplit(" ", 1)[1]


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def events_of(srv: Running, type_: str) -> list[ev.Record]:
    return [r for r in read_records(srv.spool.layout.events) if r.type == type_]


def test_clean_mail_is_spooled_as_before(srv: Running) -> None:
    code, reply = send(srv.port, HAM)
    assert code == 250
    assert srv.spool.ids() == [queued_id(reply)]
    assert files(srv.spool.layout.quarantine / "spam") == files(srv.spool.layout.quarantine / "virus") == []
    assert events_of(srv, "message_quarantined") == []


def test_gtube_goes_to_the_spam_quarantine_with_its_score(srv: Running) -> None:
    body = plain(gtube())
    code, reply = send(srv.port, body)
    assert code == 250 and reply.startswith("2.0.0 Ok: queued as ")
    mid = queued_id(reply)
    assert srv.spool.ids() == []  # nothing to send
    spam = srv.spool.layout.quarantine / "spam"
    assert files(spam) == [f"{mid}.eml", f"{mid}.json"]
    raw = (spam / f"{mid}.eml").read_bytes()
    assert raw.startswith(b"Received: from client.example ([127.0.0.1])") and raw.endswith(body)
    entry = decode_entry((spam / f"{mid}.json").read_bytes())
    assert (entry.kind, entry.sender, entry.recipients, entry.size) == (
        "spam",
        "alice@example.org",
        ["x@remote.test"],
        len(raw),
    )
    assert entry.verdict.score >= 1000 and entry.verdict.threshold == 5.0 and "GTUBE" in entry.verdict.rules
    # remove_at is computed just before the event's commit, which stamps quarantined_at
    assert dt.timedelta(days=30, seconds=-1) < entry.remove_at - entry.quarantined_at <= dt.timedelta(days=30)
    (record,) = events_of(srv, "message_quarantined")
    assert record.actor == "smtp" and record.seq == entry.seq
    payload = record.payload
    assert isinstance(payload, ev.MessageQuarantined)
    assert (payload.id, payload.kind, payload.verdict) == (mid, "spam", entry.verdict)
    assert payload.client_ip == "127.0.0.1" and payload.session_id.startswith("S")
    assert events_of(srv, "message_enqueued") == []
    assert files(srv.spool.layout.quarantine / "tmp") == []


@pytest.mark.parametrize("where", ["plain body", "base64 attachment"])
def test_eicar_goes_to_the_virus_quarantine(srv: Running, where: str) -> None:
    body = plain(eicar()) if where == "plain body" else with_attachment(eicar())
    code, reply = send(srv.port, body)
    assert code == 250
    mid = queued_id(reply)
    assert srv.spool.ids() == []
    entry = Quarantine.for_spool(srv.spool, srv.config).get("virus", mid)
    assert entry.verdict.virus == VIRUS
    (record,) = events_of(srv, "message_quarantined")
    assert record.payload.kind == "virus" and record.payload.verdict.virus == VIRUS  # type: ignore[union-attr]


def test_incoming_mail_is_scanned_only_when_configured(
    srv: Running, clamd_peer: Clamd, spamd_peer: Spamd
) -> None:
    # 127.0.0.2 is not in a trusted network: incoming mail for a local user
    srv.server.reload(
        msgspec.structs.replace(
            srv.config, smtp=msgspec.structs.replace(srv.config.smtp, mynetworks=["127.0.0.1/32"])
        )
    )
    srv.config = srv.server.config
    code, reply = send(srv.port, plain(gtube()), rcpt=f"bob@{LOCAL}", source="127.0.0.2")
    assert code == 250 and srv.spool.ids() == [queued_id(reply)]  # not scanned: spooled
    scanning(srv, clamd_peer.address, spamd_peer.address, scan_incoming=True)
    code, reply = send(srv.port, plain(gtube()), rcpt=f"bob@{LOCAL}", source="127.0.0.2")
    assert code == 250
    assert Quarantine.for_spool(srv.spool, srv.config).ids("spam") == [queued_id(reply)]
    # relayed mail from the trusted client is scanned either way
    code, reply = send(srv.port, plain(eicar()))
    assert Quarantine.for_spool(srv.spool, srv.config).ids("virus") == [queued_id(reply)]


def test_scanner_down_gives_451_and_nothing_is_lost(
    srv: Running, clamd_peer: Clamd, spamd_peer: Spamd
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    scanning(srv, dead, spamd_peer.address)
    body = plain(b"an important message")
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=90) as client:
        client.ehlo("client.example")
        client.mail("alice@example.org")
        client.rcpt("x@remote.test")
        code, msg = client.data(body)
        assert (code, msg.decode()) == (451, "4.7.1 Message cannot be scanned now, try again later")
        # nothing was kept anywhere, not even half
        assert srv.spool.ids() == []
        assert files(srv.spool.layout.tmp) == []
        for sub in ("spam", "virus", "tmp"):
            assert files(srv.spool.layout.quarantine / sub) == []
        (record,) = events_of(srv, "scanner_unavailable")
        payload = record.payload
        assert isinstance(payload, ev.ScannerUnavailable)
        assert (payload.scanners, payload.action, payload.id) == (["clamd"], "tempfail", "")
        assert f"cannot connect to {dead}" in payload.reason
        # the client still has the message; once clamd is back, its retry is accepted
        scanning(srv, clamd_peer.address, spamd_peer.address)
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=90) as client:
        client.ehlo("client.example")
        client.mail("alice@example.org")
        client.rcpt("x@remote.test")
        code, msg = client.data(body)
    assert code == 250
    (mid,) = srv.spool.ids()
    assert srv.spool.layout.eml(mid).read_bytes().endswith(body)


@pytest.fixture
def silent_scanner() -> Iterator[str]:
    """A TCP server that accepts and never answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        for s in held:
            s.close()
        listener.close()


def test_scanner_timeout_gives_451(srv: Running, silent_scanner: str) -> None:
    config = msgspec.structs.replace(
        srv.config, scan=ScanConfig(enabled=True, clamd=silent_scanner, spamd=silent_scanner, timeout=0.5)
    )
    srv.server.reload(config)
    code, msg = send(srv.port, HAM)
    assert code == 451 and msg.startswith("4.7.1")
    assert srv.spool.ids() == []
    (record,) = events_of(srv, "scanner_unavailable")
    assert sorted(record.payload.scanners) == ["clamd", "spamd"]  # type: ignore[union-attr]
    assert "within 0.5 s" in record.payload.reason  # type: ignore[union-attr]


def test_accept_unscanned_is_recorded_on_the_message_and_in_its_event(
    srv: Running, spamd_peer: Spamd
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    scanning(srv, dead, spamd_peer.address, on_failure="accept")
    code, reply = send(srv.port, HAM)
    assert code == 250
    mid = queued_id(reply)
    assert srv.spool.ids() == [mid]
    sidecar = decode_sidecar(srv.spool.layout.sidecar(mid).read_bytes())
    assert sidecar.unscanned is True
    (record,) = events_of(srv, "scanner_unavailable")
    payload = record.payload
    assert isinstance(payload, ev.ScannerUnavailable)
    assert (payload.id, payload.action, payload.scanners) == (mid, "accept", ["clamd"])
    assert sidecar.seq == record.seq
    # the log replays to the same sidecar
    report = fsck(srv.spool)
    assert report.problems == []
    # spam is still caught by the scanner that works
    code, reply = send(srv.port, plain(gtube()))
    assert code == 250 and Quarantine.for_spool(srv.spool, srv.config).ids("spam") == [queued_id(reply)]
