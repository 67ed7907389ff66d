"""Quarantine through `spool serve`: real clamd and spamd, SMTP in, the CLI,
resend delivered to Postfix's smtp-sink, virus resend refused."""

from __future__ import annotations

import json
import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from peers import SIGNATURES, Clamd, Spamd, clamd, eicar, free_port, gtube, smtp_sink, spamd
from serve_fixture import cli, serve
from test_scan import HAM, plain, with_attachment

from events import read_records

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def clamd_peer() -> Iterator[Clamd]:
    with clamd(SIGNATURES) as peer:
        yield peer


@pytest.fixture(scope="module")
def spamd_peer() -> Iterator[Spamd]:
    with spamd() as peer:
        yield peer


def send(port: int, body: bytes) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=90) as client:
        client.ehlo("client.test")
        client.mail("alice@sender.test")
        client.rcpt("bob@remote.test")
        client.rcpt("carol@remote.test")
        code, reply = client.data(body)
    assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[1]


def test_quarantine_resend_and_refusal_through_the_server(
    tmp_path: Path, clamd_peer: Clamd, spamd_peer: Spamd
) -> None:
    data, port, sink_port = tmp_path / "data", free_port(), free_port()
    config = (
        f'[smtp]\nworkers = 1\n[scan]\nenabled = true\nclamd = "{clamd_peer.address}"\n'
        f'spamd = "{spamd_peer.address}"\ntimeout = 60.0\n'
    )
    with (
        smtp_sink(port=sink_port, dump_file=tmp_path / "sink.dump") as sink,
        serve(
            data, port, "--mynetworks", "127.0.0.0/8", "--relayhost", f"127.0.0.1:{sink_port}", config=config
        ),
    ):
        clean = send(port, HAM)
        spam = send(port, plain(gtube()))
        virus = send(port, with_attachment(eicar()))
        (got,) = sink.wait_for_messages(1, timeout=60)
        assert f"id {clean}".encode() in got
        listing = cli(data, "quarantine", "list", "spam", "--json")
        assert listing.returncode == 0, listing.stderr
        (row,) = [json.loads(line) for line in listing.stdout.splitlines()]
        assert (row["id"], row["recipients"], row["verdict"]["threshold"]) == (
            spam,
            ["bob@remote.test", "carol@remote.test"],
            5.0,
        )
        assert "GTUBE" in row["verdict"]["rules"]
        viruses = cli(data, "quarantine", "list", "virus")
        assert f"{virus}.eml" in viruses.stdout and "Spoolfs.Test.EICAR.UNOFFICIAL" in viruses.stdout

        refused = cli(data, "quarantine", "resend", virus)
        assert refused.returncode == 1 and "never resent" in refused.stderr
        assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
        assert (data / "quarantine" / "virus" / f"{virus}.eml").exists()

        resent = cli(data, "quarantine", "resend", spam)
        assert resent.returncode == 0, resent.stderr
        new_id = resent.stdout.split()[-1]
        messages = sink.wait_for_messages(2, timeout=60)
        assert gtube() in messages[1] and f"id {spam}".encode() in messages[1]  # the original bytes
        assert b"bob@remote.test" in messages[1] and b"carol@remote.test" in messages[1]
        assert not (data / "quarantine" / "spam" / f"{spam}.eml").exists()
        time.sleep(1.0)
        assert len(sink.messages()) == 2  # the virus never left
    records = list(read_records(data / "events"))
    quarantined = {r.payload.id: r.payload.kind for r in records if r.type == "message_quarantined"}  # type: ignore[union-attr]
    assert quarantined == {spam: "spam", virus: "virus"}
    (link,) = [r for r in records if r.type == "quarantine_resent"]
    assert (link.payload.id, link.payload.new_id, link.actor.startswith("cli:")) == (spam, new_id, True)  # type: ignore[union-attr]
    finished = {r.payload.id for r in records if r.type == "message_finished"}  # type: ignore[union-attr]
    assert {clean, new_id} <= finished
    assert cli(data, "events", "verify").returncode == 0
    assert cli(data, "fsck").returncode == 0
