"""SMTP in: our server on an ephemeral port, real clients (smtplib, raw
sockets, swaks). What is checked is what was stored, not only the replies."""

from __future__ import annotations

import asyncio
import collections
import os
import shutil
import smtplib
import socket
import subprocess
import time
import types
import warnings
import weakref
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, auth_mechanism
from hypothesis import given, settings
from hypothesis import strategies as st
from peers import require
from smtp_fixture import Running, smtp_server

from events import clock, read_records
from spoolfs.protolog import ProtocolLog
from spoolfs.smtp.fastpath import fast_getaddr, init_smtp
from spoolfs.smtp.protocol import SpoolSMTP
from spoolfs.state import decode_sidecar
from spoolfs.users import Users

LOCAL = "example.test"


def stored(srv: Running) -> list[str]:
    return srv.spool.ids()


def add_user(srv: Running, address: str) -> None:
    Users(srv.spool.layout.data, srv.config.smtp.local_domains).add(srv.spool.log, address, "cli:test")


class Raw:
    """A raw SMTP conversation, for what smtplib will not send."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""
        self.greeting = self.reply()

    def reply(self) -> str:
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return self.buf.decode()
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            if line[3:4] != b"-":
                return line.decode()

    def cmd(self, text: str | bytes) -> str:
        self.sock.sendall(text if isinstance(text, bytes) else text.encode() + b"\r\n")
        return self.reply()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def trusted(tmp_path: Path):
    with smtp_server(tmp_path / "data", mynetworks=["127.0.0.0/8"], local_domains=[LOCAL]) as srv:
        yield srv


@pytest.fixture
def untrusted(tmp_path: Path):
    with smtp_server(tmp_path / "data", local_domains=[LOCAL]) as srv:
        add_user(srv, f"alice@{LOCAL}")
        yield srv


def test_accepts_from_trusted_and_stores_durably_before_250(trusted: Running) -> None:
    body = b"Subject: hello\r\nFrom: a@b.test\r\n\r\nline one\r\nline two\r\n"
    with smtplib.SMTP("127.0.0.1", trusted.port) as client:
        client.ehlo("client.example")
        client.mail("a@b.test")
        client.rcpt("x@remote.test")
        code, msg = client.data(body)
    assert code == 250
    mid = msg.decode().rsplit(" ", 1)[1]
    # by the time the 250 arrived, the body, the sidecar and the event are on disk
    assert stored(trusted) == [mid]
    raw = trusted.spool.layout.eml(mid).read_bytes()
    assert raw.startswith(b"Received: from client.example ([127.0.0.1])\r\n\tby ")
    assert f"id {mid}".encode() in raw.split(b"\r\n\r\n")[0]
    assert raw.endswith(body)
    sidecar = decode_sidecar(trusted.spool.layout.sidecar(mid).read_bytes())
    assert (sidecar.client_ip, sidecar.helo, sidecar.source) == ("127.0.0.1", "client.example", "smtp")
    assert sidecar.session_id.startswith("S")
    assert sidecar.sender == "a@b.test" and [r.address for r in sidecar.recipients] == ["x@remote.test"]
    events = [r for r in read_records(trusted.spool.layout.events) if r.type == "message_enqueued"]
    assert [(e.payload.id, e.actor) for e in events] == [(mid, "smtp")]  # type: ignore[union-attr]


def test_no_open_relay(untrusted: Running) -> None:
    with smtplib.SMTP("127.0.0.1", untrusted.port) as client:
        client.ehlo("client.example")
        client.mail("a@b.test")
        code, msg = client.rcpt("victim@remote.test")
        assert code == 554 and b"5.7.1" in msg and b"Relay access denied" in msg
        code, msg = client.rcpt(f"nobody@{LOCAL}")
        assert code == 550 and b"5.1.1" in msg
        code, _ = client.rcpt(f"Alice@{LOCAL.upper()}")
        assert code == 250
        code, _ = client.data(b"Subject: to alice\r\n\r\nhi\r\n")
        assert code == 250
    (mid,) = stored(untrusted)
    sidecar = decode_sidecar(untrusted.spool.layout.sidecar(mid).read_bytes())
    assert [r.address for r in sidecar.recipients] == [f"Alice@{LOCAL}"]


@pytest.mark.parametrize(
    "address",
    [
        "@relay.test:victim@remote.test",  # source route
        "@a.test,@b.test:victim@remote.test",
        f"victim%remote.test@{LOCAL}",  # percent hack
        f"remote.test!victim@{LOCAL}",  # bang path
        f'"victim@remote.test"@{LOCAL}',  # quoted local part hiding an @
        "victim@remote.test.",  # trailing dot
        f"victim@{LOCAL}.",
        "victim@[127.0.0.1",  # unbalanced bracket
        "victim@[127.0.0.1]",  # address literal: not local
        f"victim@remote.test@{LOCAL}",  # two @
        f"victim@{LOCAL}@remote.test",
        "victim@remote..test",
    ],
)
def test_address_tricks_never_relay(untrusted: Running, address: str) -> None:
    conn = Raw(untrusted.port)
    assert conn.cmd("EHLO client.example").startswith("250")
    assert conn.cmd("MAIL FROM:<a@b.test>").startswith("250")
    reply = conn.cmd(f"RCPT TO:<{address}>")
    assert reply[:3] in {"554", "501", "550", "553"}, reply
    assert conn.cmd("DATA")[:3] == "503"  # no recipient was accepted
    conn.cmd("QUIT")
    conn.close()
    assert stored(untrusted) == []


def test_size_limit(tmp_path: Path) -> None:
    with smtp_server(tmp_path / "data", mynetworks=["127.0.0.0/8"], max_message_size=10_000) as srv:
        conn = Raw(srv.port)
        conn.cmd("EHLO client.example")
        assert conn.cmd("MAIL FROM:<a@b.test> SIZE=20000").startswith("552 5.3.4")
        assert conn.cmd("MAIL FROM:<a@b.test>").startswith("250")
        assert conn.cmd("RCPT TO:<x@remote.test>").startswith("250")
        assert conn.cmd("DATA").startswith("354")
        reply = conn.cmd(b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 300 + b".\r\n")
        assert reply.startswith("552 5.3.4"), reply
        # the session goes on, and a small message still passes
        assert conn.cmd("MAIL FROM:<a@b.test>").startswith("250")
        assert conn.cmd("RCPT TO:<x@remote.test>").startswith("250")
        conn.cmd("DATA")
        assert conn.cmd(b"Subject: small\r\n\r\nok\r\n.\r\n").startswith("250")
        conn.close()
        assert len(stored(srv)) == 1


def test_recipient_limit(tmp_path: Path) -> None:
    with smtp_server(tmp_path / "data", mynetworks=["127.0.0.0/8"], max_recipients=3) as srv:
        conn = Raw(srv.port)
        conn.cmd("EHLO client.example")
        conn.cmd("MAIL FROM:<a@b.test>")
        for i in range(3):
            assert conn.cmd(f"RCPT TO:<r{i}@remote.test>").startswith("250")
        assert conn.cmd("RCPT TO:<r3@remote.test>").startswith("452 4.5.3")
        conn.cmd("DATA")
        assert conn.cmd(b"Subject: x\r\n\r\nx\r\n.\r\n").startswith("250")
        conn.close()
        (mid,) = stored(srv)
        assert len(srv.spool.get(mid).recipients) == 3


def test_line_length_limit(tmp_path: Path) -> None:
    with smtp_server(tmp_path / "data", mynetworks=["127.0.0.0/8"], max_line_length=998) as srv:
        conn = Raw(srv.port)
        conn.cmd("EHLO client.example")
        conn.cmd("MAIL FROM:<a@b.test>")
        conn.cmd("RCPT TO:<x@remote.test>")
        conn.cmd("DATA")
        reply = conn.cmd(b"Subject: long\r\n\r\n" + b"y" * 2000 + b"\r\n.\r\n")
        assert reply.startswith("500 5.5.2"), reply
        conn.close()
        assert stored(srv) == []


@pytest.mark.parametrize(
    "smuggle",
    [
        b"\n.\n",  # bare LF end of data
        b"\n.\r\n",
        b"\r\n.\n",
        b"\r.\r",
        b"\r\n.\r",
    ],
)
def test_smuggling_never_makes_two_messages(trusted: Running, smuggle: bytes) -> None:
    conn = Raw(trusted.port)
    conn.cmd("EHLO client.example")
    conn.cmd("MAIL FROM:<a@b.test>")
    conn.cmd("RCPT TO:<x@remote.test>")
    assert conn.cmd("DATA").startswith("354")
    payload = (
        b"Subject: first\r\n\r\nbody"
        + smuggle
        + b"MAIL FROM:<evil@b.test>\r\nRCPT TO:<victim@remote.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\n"
    )
    reply = conn.cmd(payload)
    assert reply.startswith("250"), reply
    conn.cmd("QUIT")
    conn.close()
    ids = stored(trusted)
    assert len(ids) == 1
    sidecar = trusted.spool.get(ids[0])
    assert sidecar.sender == "a@b.test" and [r.address for r in sidecar.recipients] == ["x@remote.test"]
    assert b"Subject: smuggled" in trusted.spool.message_bytes(ids[0])  # kept as content, not a message


def test_connections_per_client(tmp_path: Path) -> None:
    with smtp_server(tmp_path / "data", max_connections_per_client=2) as srv:
        a, b = Raw(srv.port), Raw(srv.port)
        assert a.greeting.startswith("220") and b.greeting.startswith("220")
        c = Raw(srv.port)
        assert c.greeting.startswith("421 4.7.0"), c.greeting
        c.close()
        a.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            d = Raw(srv.port)
            if d.greeting.startswith("220"):
                d.close()
                break
            d.close()
            time.sleep(0.05)
        else:
            pytest.fail("a slot did not free up after a client left")
        b.close()


def test_command_timeout(tmp_path: Path) -> None:
    with smtp_server(tmp_path / "data", command_timeout=0.5) as srv:
        conn = Raw(srv.port)
        conn.cmd("EHLO client.example")
        time.sleep(1.2)
        assert conn.reply().startswith("421 4.4.2")
        conn.close()


def test_protocol_log_has_the_session_on_every_line(trusted: Running) -> None:
    with smtplib.SMTP("127.0.0.1", trusted.port) as client:
        client.sendmail("a@b.test", ["x@remote.test"], b"Subject: x\r\n\r\nx\r\n")
    logs = trusted.spool.layout.data / "log"
    # the server logs the disconnect after the client has gone, and writes its lines in batches
    deadline = time.monotonic() + 5
    text = ""
    while not text.rstrip().endswith("disconnect") and time.monotonic() < deadline:
        time.sleep(0.02)
        text = "".join(log.read_text() for log in logs.glob("smtp-*.log"))
    assert len(list(logs.glob("smtp-*.log"))) == 1
    lines = text.splitlines()
    sessions = {line.split()[1] for line in lines}
    assert len(sessions) == 1 and next(iter(sessions)).startswith("S")
    assert any("queued as" in line for line in lines) and lines[-1].endswith("disconnect")


def test_swaks_as_a_client(trusted: Running) -> None:
    swaks = require("swaks")
    result = subprocess.run(
        [
            swaks,
            "--server",
            f"127.0.0.1:{trusted.port}",
            "--from",
            "a@b.test",
            "--to",
            "x@remote.test",
            "--header",
            "Subject: from swaks",
            "--body",
            "hello from swaks",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (mid,) = stored(trusted)
    assert b"hello from swaks" in trusted.spool.message_bytes(mid)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_disk_full_gives_452_and_recovers(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)], check=True)
    try:
        with smtp_server(mnt / "data", mynetworks=["127.0.0.0/8"]) as srv:
            with smtplib.SMTP("127.0.0.1", srv.port) as client:
                client.sendmail("a@b.test", ["x@remote.test"], b"Subject: first\r\n\r\nkept\r\n")
            first = stored(srv)
            assert len(first) == 1
            filler = mnt / "filler"
            with open(filler, "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError:
                    pass
            conn = Raw(srv.port)
            conn.cmd("EHLO client.example")
            conn.cmd("MAIL FROM:<a@b.test>")
            conn.cmd("RCPT TO:<x@remote.test>")
            conn.cmd("DATA")
            reply = conn.cmd(b"Subject: second\r\n\r\n" + (b"z" * 70 + b"\r\n") * 3000 + b".\r\n")
            assert reply.startswith("452 4.3.1"), reply
            conn.close()
            assert stored(srv) == first
            assert srv.spool.message_bytes(first[0]).endswith(b"kept\r\n")
            filler.unlink()
            with smtplib.SMTP("127.0.0.1", srv.port) as client:
                client.sendmail("a@b.test", ["x@remote.test"], b"Subject: third\r\n\r\nback\r\n")
            assert len(stored(srv)) == 2
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# --- aiosmtpd's costs, bypassed without a change in behaviour (spoolfs.smtp.fastpath) ---


class _AuthHandler:
    """A handler with everything aiosmtpd introspects: hooks, an AUTH mechanism, a 5-argument EHLO hook."""

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ):
        return responses

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 OK"

    async def auth_PLAIN(self, server: Any, args: list[str]) -> None:  # replaces the built-in one
        return None

    @auth_mechanism("X-TOKEN")
    async def auth_token(self, server: Any, args: list[str]) -> None:
        return None


class _OldEhloHandler:
    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str) -> str:
        return "250 old"


def _canon(value: Any, owner: object) -> Any:
    """A comparable picture of one attribute: bound methods by function and owner, fresh objects by type."""
    if isinstance(value, types.MethodType):
        return ("method", value.__func__, "self" if value.__self__ is owner else value.__self__)
    if isinstance(value, dict):
        return [(k, _canon(v, owner)) for k, v in value.items()]  # order matters too
    if isinstance(value, tuple):
        return (type(value), *(_canon(v, owner) for v in value))
    if isinstance(value, asyncio.StreamReader):
        return ("StreamReader", value._limit)  # type: ignore[attr-defined]
    if isinstance(value, weakref.ref | asyncio.Future | collections.deque):
        return type(value)
    return value


@pytest.mark.parametrize(
    ("handler", "kwargs"),
    [
        (None, {}),
        ("spool", {"data_size_limit": 1000, "enable_SMTPUTF8": True, "hostname": "h.test", "ident": "x"}),
        (_AuthHandler(), {"auth_exclude_mechanism": ["LOGIN"], "command_call_limit": 7}),
        (_AuthHandler(), {"authenticator": lambda *a: None, "command_call_limit": {"*": 3, "MAIL": 2}}),
        (_OldEhloHandler(), {"auth_required": True, "auth_require_tls": False, "proxy_protocol_timeout": 5}),
    ],
)
def test_cached_init_builds_what_aiosmtpd_builds(
    trusted: Running, handler: Any, kwargs: dict[str, Any]
) -> None:
    if handler == "spool":
        handler = trusted.server.handler
    loop = asyncio.new_event_loop()
    try:
        built = []
        for init in (SMTP.__init__, init_smtp, init_smtp):  # the second init_smtp reads the cache
            proto = SpoolSMTP.__new__(SpoolSMTP)
            proto.line_length_limit = 1000
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                init(proto, handler, loop=loop, **kwargs)
            state = {k: _canon(v, proto) for k, v in vars(proto).items()}
            built.append((state, [(w.category, str(w.message)) for w in caught]))
        assert built[1] == built[0]
        assert built[2] == built[0]
    finally:
        loop.close()


def test_cached_init_refuses_what_aiosmtpd_refuses() -> None:
    class Bad:
        async def handle_EHLO(self, server: Any) -> str:
            return "250"

    loop = asyncio.new_event_loop()
    try:
        for init in (SMTP.__init__, init_smtp):
            proto = SpoolSMTP.__new__(SpoolSMTP)
            with pytest.raises(RuntimeError, match="Unsupported EHLO Hook"):
                init(proto, Bad(), loop=loop)
            with pytest.raises(ValueError, match="proxy_protocol_timeout"):
                init(proto, None, loop=loop, proxy_protocol_timeout=0)
    finally:
        loop.close()


class _Addr:
    local_part_limit = 0


def _library_getaddr(arg: str) -> Any:
    try:
        return SMTP._getaddr(_Addr(), arg)  # type: ignore[arg-type]
    except Exception as exc:  # the header parser raises more than HeaderParseError
        return type(exc)


_ADDRESS_BITS = st.sampled_from(
    [
        *(
            "a",
            "B",
            "0",
            ".",
            "@",
            "<",
            ">",
            "=?",
            "?=",
            '"',
            "(",
            ")",
            "[",
            "]",
            ":",
            ",",
            ";",
            "\\",
            "!",
            "%",
        ),
        *(
            "'",
            " ",
            "\t",
            "\x0b",
            "\r",
            "\x1c",
            "\u2003",
            "ü",
            "-",
            "_",
            "example.org",
            "SIZE=10",
            "=?utf-8?q?x?=",
        ),
    ]
)


@settings(max_examples=3000, deadline=None, derandomize=True)
@given(st.lists(_ADDRESS_BITS, max_size=12).map("".join))
def test_fast_getaddr_agrees_with_aiosmtpd(arg: str) -> None:
    for text in (arg, f"<{arg}", f"<a@b.test>{arg}", f"<{arg}@x.test> SIZE=1", f"<x@{arg}>"):
        found = fast_getaddr(text)
        if found is not None:
            assert found == _library_getaddr(text), text


@pytest.mark.parametrize(
    "arg",
    [
        "<a@b.test>",
        "<a@b.test> SIZE=1 BODY=8BITMIME",
        "<a@b.test>SIZE=1",
        "<a@b.test> \t SIZE=1",
        "<>",
        "<> SIZE=3",
        "<prvs=1234=x.y+z@Example.ORG>",
        "<SRS0=abcd=TT=example.com=x@b.test>",
    ],
)
def test_fast_getaddr_takes_the_plain_forms(arg: str) -> None:
    assert fast_getaddr(arg) == _library_getaddr(arg)


@pytest.mark.parametrize(
    "arg",
    [
        "a@b.test",  # no angle brackets
        "<@relay.test:victim@remote.test>",  # source route: aiosmtpd drops it
        '<"a b"@c.test>',
        "<a@[127.0.0.1]>",
        "<a@b.test.>",
        "<a..b@c.test>",
        "<=?utf-8?q?x?=@b.test>",  # aiosmtpd decodes the encoded word
        "<a@b.test> (comment) SIZE=1",
        "<ü@b.test>",
        "<a@b.test",
    ],
)
def test_fast_getaddr_leaves_the_rest_to_aiosmtpd(arg: str) -> None:
    assert fast_getaddr(arg) is None


def test_ehlo_reply_is_one_write(trusted: Running) -> None:
    conn = Raw(trusted.port)
    conn.sock.sendall(b"EHLO client.example\r\n")
    first = conn.sock.recv(65536).decode()  # one send() arrives as one segment on loopback
    lines = first.split("\r\n")
    assert lines[-2].startswith("250 ") and all(line.startswith("250-") for line in lines[:-2]), first
    assert "250-PIPELINING" in lines and "250-ENHANCEDSTATUSCODES" in lines and "250-SMTPUTF8" in lines
    conn.close()


# --- the protocol log, batched (spoolfs.protolog) ---


def test_protolog_batches_and_writes_on_close(tmp_path: Path) -> None:
    log = ProtocolLog(tmp_path, "smtp", flush_interval=3600)

    async def session() -> None:
        log.write("S1", "connect")
        log.write("S1", "line with\r\nnewline")

    asyncio.run(session())
    assert list(tmp_path.glob("*.log")) == [] or (tmp_path / f"smtp-{_today()}.log").read_text() == ""
    log.close()
    lines = (tmp_path / f"smtp-{_today()}.log").read_text().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == ["S1 connect", "S1 line with  newline"]
    assert all(len(line.split(" ", 1)[0]) == len("2026-11-29T15:02:03.123456Z") for line in lines)
    log.write("S2", "after close")  # written at once
    assert (tmp_path / f"smtp-{_today()}.log").read_text().endswith("S2 after close\n")


def test_protolog_flushes_on_its_timer_and_outside_a_loop(tmp_path: Path) -> None:
    log = ProtocolLog(tmp_path, "smtp", flush_interval=0.05)
    path = tmp_path / f"smtp-{_today()}.log"

    async def session() -> str:
        log.write("S1", "connect")
        await asyncio.sleep(0.3)
        return path.read_text()

    assert asyncio.run(session()).endswith("S1 connect\n")
    log.write("S1", "from a thread, no loop")  # nothing would ever flush it: written at once
    assert path.read_text().endswith("S1 from a thread, no loop\n")
    log.close()


def test_protolog_two_writers_never_split_a_line(tmp_path: Path) -> None:
    a = ProtocolLog(tmp_path, "smtp", flush_interval=3600)
    b = ProtocolLog(tmp_path, "smtp", flush_interval=3600)

    async def both() -> None:
        for i in range(3000):
            a.write("SA", f"a line {i} " + "x" * 40)
            b.write("SB", f"b line {i} " + "y" * 40)

    asyncio.run(both())  # 64 KiB batches, each one write
    a.close()
    b.close()
    lines = (tmp_path / f"smtp-{_today()}.log").read_text().splitlines()
    assert len(lines) == 6000
    assert [line for line in lines if " SA " in line] == sorted(
        (line for line in lines if " SA " in line), key=lambda line: int(line.split()[4])
    )
    assert all(line.endswith("x" * 40) or line.endswith("y" * 40) for line in lines)


def _today() -> str:
    return clock.now().strftime("%Y-%m-%d")
