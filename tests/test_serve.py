"""`spool serve` as a real server: subprocesses, real clients, real receivers.

The supervisor and its workers run as they do in production; tests talk to
them only over SMTP, the CLI and the files. Receivers are Postfix's
smtp-sink; local mail is read by Dovecot.
"""

from __future__ import annotations

import os
import random
import re
import signal
import smtplib
import subprocess
import threading
import time
from pathlib import Path

import pytest
from peers import dovecot, free_port, imap_count, smtp_sink
from serve_fixture import cli, serve, wait_until

from events import read_records
from spoolfs.config import load_config
from spoolfs.spool import Spool
from spoolfs.users import Users

pytestmark = pytest.mark.slow


def send(port: int, rcpt: str = "x@remote.test", subject: str = "test") -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        client.mail("a@sender.test")
        code, reply = client.rcpt(rcpt)
        if code != 250:
            raise smtplib.SMTPRecipientsRefused({rcpt: (code, reply)})
        code, reply = client.data(f"Subject: {subject}\r\n\r\nhello\r\n".encode())
    assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[1]


def ids_in(messages: list[bytes]) -> list[str]:
    return [
        m.group(1).decode() for msg in messages for m in re.finditer(rb"\(spoolfs\) with \w+ id (\w+)", msg)
    ]


def test_accept_deliver_and_control_events(tmp_path: Path) -> None:
    data, port, sink_port = tmp_path / "data", free_port(), free_port()
    with (
        smtp_sink(port=sink_port, dump_file=tmp_path / "sink.dump") as sink,
        serve(data, port, "--mynetworks", "127.0.0.0/8", "--relayhost", f"127.0.0.1:{sink_port}") as proc,
    ):
        first = send(port)
        sink.wait_for_messages(1, timeout=30)
        wait_until(
            lambda: first not in Spool.open(load_config(data_dir=str(data))).ids(), 30, "first delivered"
        )

        # a stopped service stops; held and deleted messages are not delivered
        assert cli(data, "services", "stop", "delivery").returncode == 0
        wait_until(
            lambda: "stopped delivery" in (tmp_path / f"serve-{port}.log").read_text(), 30, "delivery stop"
        )
        listing = cli(data, "services", "list").stdout
        assert re.search(r"delivery\s+Inactive", listing) and re.search(r"smtp\s+Active", listing)
        held, deleted, normal = (
            send(port, subject="held"),
            send(port, subject="deleted"),
            send(port, subject="normal"),
        )
        assert cli(data, "hold", held).returncode == 0
        assert cli(data, "delete", deleted).returncode == 0
        assert cli(data, "services", "start", "delivery").returncode == 0
        sink.wait_for_messages(2, timeout=30)
        time.sleep(1.5)
        assert ids_in(sink.messages()) == [first, normal]
        assert cli(data, "release", held).returncode == 0
        sink.wait_for_messages(3, timeout=30)
        assert ids_in(sink.messages()) == [first, normal, held]
        assert proc.poll() is None
    types = [r.type for r in read_records(data / "events")]
    assert types.count("service_stopped") >= 2 and types.count("message_finished") == 3


def test_force_jumps_a_long_backoff(tmp_path: Path) -> None:
    data, port, sink_port = tmp_path / "data", free_port(), free_port()
    config = "[delivery]\nmin_backoff = 3600.0\nmax_backoff = 7200.0\n"
    with serve(
        data, port, "--mynetworks", "127.0.0.0/8", "--relayhost", f"127.0.0.1:{sink_port}", config=config
    ):
        with smtp_sink(port=sink_port, reply_4xx=["RCPT"]):
            mid = send(port)
            wait_until(
                lambda: any(r.type == "message_deferred" for r in read_records(data / "events")),
                15,
                "a deferral",
            )
        with smtp_sink(port=sink_port, dump_file=tmp_path / "ok.dump") as sink:
            time.sleep(0.5)
            assert sink.messages() == []  # an hour to go
            assert cli(data, "force", mid).returncode == 0
            assert ids_in(sink.wait_for_messages(1, timeout=30)) == [mid]


def test_a_dead_worker_is_restarted_and_the_rest_go_on(tmp_path: Path) -> None:
    data, port = tmp_path / "data", free_port()
    with serve(data, port, "--mynetworks", "127.0.0.0/8", "--relayhost", "127.0.0.1:9") as proc:

        def workers() -> list[int]:
            out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True, check=False)
            return [int(p) for p in out.stdout.split()]

        def listeners() -> int:
            """Sockets listening on the port: one per SMTP worker (SO_REUSEPORT)."""
            rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
            return sum(1 for r in rows if r.split()[1].endswith(f":{port:04X}") and r.split()[3] == "0A")

        wait_until(lambda: listeners() >= 2, 30, "both SMTP workers to listen")
        before = workers()
        assert len(before) >= 4
        os.kill(before[0], signal.SIGKILL)
        wait_until(lambda: before[0] not in workers(), 30, "the worker to die")
        send(port)  # the port is still served
        wait_until(lambda: len(workers()) == len(before) and before[0] not in workers(), 30, "a restart")


def test_sigterm_stops_gracefully(tmp_path: Path) -> None:
    data, port = tmp_path / "data", free_port()
    with serve(data, port, "--mynetworks", "127.0.0.0/8", "--relayhost", "127.0.0.1:9") as proc:
        send(port)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    types = [r.type for r in read_records(data / "events")]
    assert types.count("service_stopped") == 4


def test_local_delivery_through_the_server_read_by_dovecot(tmp_path: Path) -> None:
    data, port = tmp_path / "data", free_port()
    with serve(data, port, "--local-domain", "example.test"):
        assert cli(data, "users", "add", "bob@example.test").returncode == 0
        for i in range(2):
            send(port, "bob@example.test", subject=f"local {i}")
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            send(port, "nobody@example.test")
        maildir = Users(data, ["example.test"]).maildir(data, "bob@example.test")
        wait_until(
            lambda: len(list((maildir / "new").glob("*"))) == 2 if (maildir / "new").exists() else False,
            15,
            "two local deliveries",
        )
    with dovecot(maildir.parent, "bob") as imap:
        assert imap_count(imap.port, imap.user, imap.password) == 2


def test_pickup_directory(tmp_path: Path) -> None:
    data, port, sink_port = tmp_path / "data", free_port(), free_port()
    with (
        smtp_sink(port=sink_port, dump_file=tmp_path / "sink.dump") as sink,
        serve(data, port, "--relayhost", f"127.0.0.1:{sink_port}"),
    ):
        drop = data / "pickup"
        wait_until(drop.exists, 30, "pickup/")
        staged = tmp_path / "staged.eml"
        staged.write_bytes(
            b"X-Spool-From: a@sender.test\r\nX-Spool-To: x@remote.test\r\nSubject: picked\r\n\r\nhi\r\n"
        )
        os.rename(staged, drop / "m1.eml")
        (got,) = sink.wait_for_messages(1, timeout=30)
        assert b"Subject: picked" in got and b"X-Spool-From" not in got
        wait_until(lambda: not (drop / "m1.eml").exists(), 5, "the dropped file to go")
        bad = tmp_path / "bad.eml"
        bad.write_bytes(b"Subject: no envelope\r\n\r\nhi\r\n")
        os.rename(bad, drop / "m2.eml")
        wait_until((drop / "bad" / "m2.error").exists, 30, "the bad file to be set aside")
        assert (drop / "bad" / "m2.eml").exists()


def test_sigkill_during_ingest_and_delivery_loses_nothing(tmp_path: Path) -> None:
    """Every 250-acknowledged message is delivered, exactly once if its delivery
    event was durable before the kill; none is lost."""
    data, port, sink_port = tmp_path / "data", free_port(), free_port()
    acked: list[str] = []
    rng = random.Random(7)
    with smtp_sink(port=sink_port, dump_file=tmp_path / "sink.dump") as sink:
        for round_ in range(3):
            with serve(
                data, port, "--mynetworks", "127.0.0.0/8", "--relayhost", f"127.0.0.1:{sink_port}"
            ) as proc:
                stop = threading.Event()

                def client() -> None:
                    while not stop.is_set():
                        try:
                            acked.append(send(port, subject=f"round {round_}"))
                        except (OSError, smtplib.SMTPException, AssertionError):
                            return

                threads = [threading.Thread(target=client) for _ in range(4)]
                for t in threads:
                    t.start()
                time.sleep(rng.uniform(0.5, 1.5))
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                stop.set()
                for t in threads:
                    t.join(30)
            durable_delivered = {
                r.payload.id  # type: ignore[union-attr]
                for r in read_records(data / "events")
                if r.type == "delivery_attempted" and r.payload.result == "delivered"  # type: ignore[union-attr]
            }
            seen = ids_in(sink.messages())
            for mid in durable_delivered:
                assert seen.count(mid) >= 1
        # a last, calm run delivers whatever was left
        with serve(data, port, "--mynetworks", "127.0.0.0/8", "--relayhost", f"127.0.0.1:{sink_port}"):
            wait_until(
                lambda: not Spool.open(load_config(data_dir=str(data))).ids(), 60, "the spool to drain"
            )
        seen = ids_in(sink.wait_for_messages(len(set(acked)), timeout=30))
    assert acked, "the clients got no 250 at all"
    missing = [m for m in acked if m not in seen]
    assert missing == [], f"{len(missing)} acknowledged messages were never delivered"
    # a message may go twice only if the kill came between the receiver's 250 and our durable event
    twice = {m for m in seen if seen.count(m) > 1}
    assert len(twice) <= 3 * 20, twice  # at most what was in flight at each kill
    assert cli(data, "events", "verify").returncode == 0
    check = cli(data, "fsck")  # the supervisor's recovery at each start mended every crash
    assert check.returncode == 0, check.stdout


def test_sighup_reloads_the_config(tmp_path: Path) -> None:
    data, port = tmp_path / "data", free_port()
    with serve(data, port) as proc:
        assert cli(data, "users", "add", "dora@late.test").returncode == 0
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            send(port, "dora@late.test")  # not a local domain yet: relay denied
        (tmp_path / f"spool-{port}.toml").write_text('[smtp]\nlocal_domains = ["late.test"]\n')
        proc.send_signal(signal.SIGHUP)
        log = tmp_path / f"serve-{port}.log"
        wait_until(lambda: "configuration reloaded" in log.read_text(), 30, "the reload")

        def accepted() -> bool:
            try:
                send(port, "dora@late.test")
                return True
            except smtplib.SMTPRecipientsRefused:
                return False

        wait_until(accepted, 30, "the new local domain to be accepted")
        (tmp_path / f"spool-{port}.toml").write_text("[smtp]\nbogus = 1\n")
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "reload refused" in log.read_text(), 30, "a bad config to be refused")
        assert proc.poll() is None
        send(port, "dora@late.test")  # still serving with the last good config
