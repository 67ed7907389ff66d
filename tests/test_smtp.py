"""SMTP in: our server on an ephemeral port, real clients (smtplib, raw
sockets, swaks). What is checked is what was stored, not only the replies."""

from __future__ import annotations

import asyncio
import collections
import itertools
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
from spoolfs.smtp import data as bulk_data
from spoolfs.smtp import protocol as protocol_module
from spoolfs.smtp.fastpath import fast_getaddr, init_smtp
from spoolfs.smtp.protocol import ConnectionCounter, SpoolSMTP
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
@pytest.mark.parametrize("pieces", [False, True])
def test_smuggling_never_makes_two_messages(trusted: Running, smuggle: bytes, pieces: bool) -> None:
    conn = Raw(trusted.port)
    conn.cmd("EHLO client.example")
    conn.cmd("MAIL FROM:<a@b.test>")
    conn.cmd("RCPT TO:<x@remote.test>")
    assert conn.cmd("DATA").startswith("354")
    head = b"Subject: first\r\n\r\nbody"
    rest = b"MAIL FROM:<evil@b.test>\r\nRCPT TO:<victim@remote.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\n"
    if pieces:  # the would-be end of data one byte a read, as a slow client sends it
        send_slowly(conn, [head, *(smuggle[i : i + 1] for i in range(len(smuggle))), rest[:5]])
        reply = conn.cmd(rest[5:])
    else:
        reply = conn.cmd(head + smuggle + rest)
    assert reply.startswith("250"), reply
    conn.cmd("QUIT")
    conn.close()
    ids = stored(trusted)
    assert len(ids) == 1
    sidecar = trusted.spool.get(ids[0])
    assert sidecar.sender == "a@b.test" and [r.address for r in sidecar.recipients] == ["x@remote.test"]
    assert b"Subject: smuggled" in trusted.spool.message_bytes(ids[0])  # kept as content, not a message


def send_slowly(conn: Raw, pieces: list[bytes]) -> None:
    """Each piece in its own segment, read by the server before the next one arrives."""
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for piece in pieces:
        conn.sock.sendall(piece)
        time.sleep(0.01)


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


# --- DATA read in bulk (spoolfs.smtp.data) ---

# A body with dot-stuffed lines, an empty line, a lone CR and LF, and dots inside lines.
_STUFFED = b"Subject: pieces\r\n\r\n..leading dot\r\nplain . dot\r\n...\r\n\r\nbare\rcr and\nlf\r\n.\r\n"
_UNSTUFFED = b"Subject: pieces\r\n\r\n.leading dot\r\nplain . dot\r\n..\r\n\r\nbare\rcr and\nlf\r\n"


def _split(data: bytes, *cuts: int) -> list[bytes]:
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def _transaction(conn: Raw) -> None:
    assert conn.cmd("MAIL FROM:<a@b.test>").startswith("250")
    assert conn.cmd("RCPT TO:<x@remote.test>").startswith("250")
    assert conn.cmd("DATA").startswith("354")


@pytest.mark.parametrize(
    "pieces",
    [
        pytest.param([line + b"\n" for line in _STUFFED.split(b"\n")[:-1]], id="line-by-line"),
        pytest.param(_split(_STUFFED, len(_STUFFED) - 3), id="end-line-alone"),
        pytest.param(_split(_STUFFED, len(_STUFFED) - 2), id="end-after-CRLF-dot"),
        pytest.param(_split(_STUFFED, len(_STUFFED) - 1), id="end-between-CR-and-LF"),
        pytest.param(_split(_STUFFED, len(_STUFFED) - 4), id="end-between-CR-LF-of-last-line"),
        pytest.param(_split(_STUFFED, 18, 19, 20, 21, 46, 47, 48, 49), id="stuffed-dots-split"),
        pytest.param([_STUFFED[i : i + 1] for i in range(len(_STUFFED))], id="byte-by-byte"),
    ],
)
def test_data_arriving_in_pieces(trusted: Running, pieces: list[bytes]) -> None:
    assert b"".join(pieces) == _STUFFED
    conn = Raw(trusted.port)
    conn.cmd("EHLO client.example")
    _transaction(conn)
    send_slowly(conn, pieces[:-1])
    assert conn.cmd(pieces[-1]).startswith("250 2.0.0 Ok: queued as")
    assert conn.cmd("QUIT").startswith("221")
    conn.close()
    (mid,) = stored(trusted)
    assert trusted.spool.message_bytes(mid).endswith(b"\r\n" + _UNSTUFFED)


def test_data_pipelined_after_the_end_line(trusted: Running) -> None:
    """What follows the end line in the same segment is left for the command loop."""
    conn = Raw(trusted.port)
    conn.cmd("EHLO client.example")
    second = b"Subject: second\r\n\r\n..\r\nend\r\n"
    conn.sock.sendall(
        b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@remote.test>\r\nDATA\r\n"
        + _STUFFED
        + b"MAIL FROM:<b@b.test>\r\nRCPT TO:<y@remote.test>\r\nDATA\r\n"
        + second
        + b".\r\nQUIT\r\n"
    )
    replies = [conn.reply()[:3] for _ in range(9)]
    assert replies == ["250", "250", "354", "250", "250", "250", "354", "250", "221"]
    conn.close()
    bodies = {trusted.spool.get(mid).sender: trusted.spool.message_bytes(mid) for mid in stored(trusted)}
    assert bodies["a@b.test"].endswith(b"\r\n" + _UNSTUFFED)
    assert bodies["b@b.test"].endswith(b"\r\nSubject: second\r\n\r\n.\r\nend\r\n")


def test_data_first_line_is_the_end_line(trusted: Running) -> None:
    conn = Raw(trusted.port)
    conn.cmd("EHLO client.example")
    conn.sock.sendall(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@remote.test>\r\nDATA\r\n.\r\nQUIT\r\n")
    assert [conn.reply()[:3] for _ in range(5)] == ["250", "250", "354", "250", "221"]
    conn.close()
    (mid,) = stored(trusted)
    # an empty body: nothing but the Received header the server prepends
    first, *folded, last = trusted.spool.message_bytes(mid).split(b"\r\n")
    assert first.startswith(b"Received: ") and all(line[:1] == b"\t" for line in folded) and last == b""


def test_data_large_body_over_many_reads(trusted: Running) -> None:
    lines = [b"." * (i % 7) + b"line %d" % i + b"x" * (i % 90) for i in range(40_000)]
    body = b"".join(line + b"\r\n" for line in lines)
    stuffed = b"".join((b"." + line if line[:1] == b"." else line) + b"\r\n" for line in lines)
    conn = Raw(trusted.port)
    conn.cmd("EHLO client.example")
    _transaction(conn)
    assert conn.cmd(stuffed + b".\r\nQUIT\r\n").startswith("250")
    assert conn.reply().startswith("221")
    conn.close()
    (mid,) = stored(trusted)
    assert trusted.spool.message_bytes(mid).endswith(b"\r\n" + body)


def test_refused_bodies_are_drained_to_the_end_line(tmp_path: Path) -> None:
    with smtp_server(
        tmp_path / "data", mynetworks=["127.0.0.0/8"], max_message_size=10_000, max_line_length=100
    ) as srv:
        conn = Raw(srv.port)
        conn.cmd("EHLO client.example")
        _transaction(conn)
        big = b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 3000
        send_slowly(conn, [big[:5000], big[5000:20000]])
        assert conn.cmd(big[20000:] + b".\r\nRSET\r\n").startswith("552 5.3.4")
        assert conn.reply().startswith("250")  # the RSET, read as a command
        _transaction(conn)
        # the ".\r\n" ending an overlong line is not the end line, even at the start of a read
        send_slowly(conn, [b"Subject: long\r\n\r\n" + b"y" * 5000 + b".", b"\r\nQUIT\r\n"])
        assert conn.cmd(b".\r\nRSET\r\n").startswith("500 5.5.2")
        assert conn.reply().startswith("250")
        _transaction(conn)
        assert conn.cmd(b"Subject: fine\r\n\r\n" + b"z" * 100 + b"\r\n.\r\n").startswith("250 2.0.0")
        conn.close()
        (mid,) = stored(srv)
        assert srv.spool.message_bytes(mid).endswith(b"z" * 100 + b"\r\n")


def test_data_stalled_times_out(tmp_path: Path) -> None:
    """The DATA command's timer runs through the body: a client that stops mid-body is let go."""
    with smtp_server(tmp_path / "data", mynetworks=["127.0.0.0/8"], command_timeout=0.5) as srv:
        conn = Raw(srv.port)
        conn.cmd("EHLO client.example")
        _transaction(conn)
        send_slowly(conn, [b"Subject: slow\r\n\r\n", b"half a line"])
        time.sleep(1.2)
        assert conn.reply().startswith("421 4.4.2")
        assert conn.sock.recv(100) == b""  # closed
        conn.close()
        assert stored(srv) == []


class _Wire(asyncio.Transport):
    """A transport under the test's control: what the server writes is kept."""

    def __init__(self, protocol: asyncio.Protocol) -> None:
        super().__init__({"peername": ("127.0.0.1", 40000)})
        self.protocol = protocol
        self.out = bytearray()
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class _Notes:
    """The protocol log and the handler in one: what the server logged and what it handed over."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.seen: list[tuple[Any, ...]] = []

    def write(self, sid: str, text: str) -> None:
        self.lines.append(text)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.seen.append((envelope.mail_from, envelope.rcpt_tos, envelope.content, envelope.original_content))
        return "250 OK"


class _LineByLine(SpoolSMTP):
    """SpoolSMTP with aiosmtpd's own DATA reader: the reference."""

    async def smtp_DATA(self, arg: str) -> None:
        await SMTP.smtp_DATA(self, arg)


async def _settle(proto: SMTP) -> None:
    """Run the session until it waits for the client or has ended."""
    for _ in range(200):
        await asyncio.sleep(0)
        task = proto._handler_coroutine
        if task is not None and (task.done() or proto._reader._waiter is not None):
            await asyncio.sleep(0)  # a close() schedules connection_lost
            return


async def _session(
    cls: type[SpoolSMTP], chunks: list[bytes], ending: str = "quit", **kwargs: Any
) -> tuple[Any, ...]:
    """A whole session fed to a protocol object in these chunks: (transcript, log, handed over, rest)."""
    notes = _Notes()
    kwargs.setdefault("max_line_length", 998)
    proto = cls(
        notes,
        counter=ConnectionCounter(10),
        protolog=notes,  # type: ignore[arg-type]
        hostname="mx.test",
        ident="test",
        loop=asyncio.get_running_loop(),
        **kwargs,
    )
    wire = _Wire(proto)
    proto.connection_made(wire)
    for chunk in chunks:
        await _settle(proto)
        if wire.closing:
            break
        proto.data_received(chunk)
    await _settle(proto)
    if not wire.closing:
        if ending == "eof":
            proto.eof_received()
            proto.connection_lost(None)
        else:
            proto.connection_lost(ConnectionResetError())
        wire.closing = True
        await _settle(proto)
    rest = bytes(proto._reader._buffer)
    return bytes(wire.out), notes.lines, notes.seen, rest


def _both(chunks: list[bytes], ending: str = "quit", **kwargs: Any) -> tuple[Any, ...]:
    async def run() -> tuple[Any, ...]:
        return (
            await _session(SpoolSMTP, chunks, ending, **kwargs),
            await _session(_LineByLine, chunks, ending, **kwargs),
        )

    ours, theirs = asyncio.run(run())
    assert ours == theirs
    return ours  # type: ignore[no-any-return]


_HEAD = b"EHLO client.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\n"


@pytest.mark.parametrize(
    ("chunks", "content"),
    [
        ([b"a\r\n", b".\r\nQUIT\r\n"], b"a\r\n"),  # the body ends exactly where a read ends
        ([b"a\r\n.", b"\r\nQUIT\r\n"], b"a\r\n"),
        ([b"a\r\n.\r", b"\nQUIT\r\n"], b"a\r\n"),
        ([b"a\r", b"\n.\r\nQUIT\r\n"], b"a\r\n"),
        ([b".", b"\r\nQUIT\r\n"], b""),  # an empty body, its end line split
        ([b".\r\nQUIT\r\n"], b""),
        ([b"..", b"x\r\n.", b".y\r\n.", b".\r\n", b".\r\nQUIT\r\n"], b".x\r\n.y\r\n.\r\n"),
        # the smuggling sequences: content, with one dot taken off the line ".\n\r\n"
        (
            [b"a\n.\n", b"b\r.\r", b"x\n.\r\n", b"c\r\n.\n", b"\r\n.\r\nQUIT\r\n"],
            b"a\n.\nb\r.\rx\n.\r\nc\r\n\n\r\n",
        ),
        ([b"a\r\n.\r\nMAIL FROM:<c@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\nb\r\n.\r\nQUIT\r\n"], b"a\r\n"),
    ],
)
def test_bulk_reader_at_read_boundaries(chunks: list[bytes], content: bytes) -> None:
    transcript, _, seen, rest = _both([_HEAD, *chunks])
    assert seen[0][3] == content
    assert transcript.endswith(b"250 2.0.0 Ok\r\n221 2.0.0 Bye\r\n") and rest == b""


@pytest.mark.parametrize(
    ("chunks", "reply"),
    [
        ([b"x" * 30 + b"\r\n.\r\nQUIT\r\n"], b"500 5.5.2"),  # longer than the stream limit
        ([b"x" * 11, b"x" * 11, b"x" * 11, b"\r\n.\r\nQUIT\r\n"], b"500 5.5.2"),
        ([b"x" * 21 + b"\r\n.\r\nQUIT\r\n"], b"500 5.5.2"),  # only aiosmtpd's second check sees it
        ([b"x" * 20 + b"\r\n.\r\nQUIT\r\n"], b"250 2.0.0"),
        ([(b"y" * 18 + b"\r\n") * 10, b".\r\nQUIT\r\n"], b"552 5.3.4"),
        ([(b"y" * 18 + b"\r\n") * 5 + b"y" * 21 + b"\r\n.\r\nQUIT\r\n"], b"552 5.3.4"),  # size first
        ([(b"y" * 18 + b"\r\n") * 5 + b"y" * 23 + b"\r\n.\r\nQUIT\r\n"], b"500 5.5.2"),  # length first
        ([b"x" * 40, b"\r\n.\r\n" + b"x" * 40, b"\r", b"\n.", b"\r\nQUIT\r\n"], b"500 5.5.2"),
        ([b"x" * 40 + b"\r", b"\n.\r\nQUIT\r\n"], b"500 5.5.2"),  # the CRLF of an overlong line split
        ([b"x" * 40 + b".", b"\r\nRSET\r\n.\r\nQUIT\r\n"], b"500 5.5.2"),  # ".\r\n" ending a line
        # a line of exactly the stream limit, its CRLF split, the size limit crossed on it: size first
        ([(b"y" * 18 + b"\r\n") * 5 + b"x" * 22 + b"\r", b"\n.\r\nQUIT\r\n"], b"552 5.3.4"),
        ([(b"y" * 18 + b"\r\n") * 5 + b"x" * 23 + b"\r\n.\r\nQUIT\r\n"], b"500 5.5.2"),
        ([(b"y" * 18 + b"\r\n") * 3, (b"y" * 18 + b"\r\n") * 3, b".\r\nQUIT\r\n"], b"250 2.0.0"),  # 120 bytes
        (
            [(b"y" * 18 + b"\r\n") * 3, (b"y" * 18 + b"\r\n") * 2, b"y" * 19 + b"\r\n.\r\nQUIT\r\n"],
            b"552 5.3.4",
        ),
    ],
)
def test_bulk_reader_refusals(chunks: list[bytes], reply: bytes) -> None:
    transcript, log_lines, seen, _ = _both([_HEAD, *chunks], max_line_length=20, data_size_limit=120)
    _, after_354 = transcript.split(b"354 End data with <CR><LF>.<CR><LF>\r\n")
    assert after_354.startswith(reply) and after_354.endswith(b"\r\n221 2.0.0 Bye\r\n"), after_354
    assert (seen == []) == (reply != b"250 2.0.0")


def test_bulk_reader_when_the_connection_goes() -> None:
    for ending in ("eof", "lost"):
        transcript, _, seen, _ = _both([_HEAD, b"half a body\r\n.", b"\r"], ending)
        assert transcript.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n") and seen == []


def test_other_aiosmtpd_versions_keep_its_data_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    async def refuse(smtp: Any) -> Any:
        raise AssertionError("the bulk reader was used")

    monkeypatch.setattr(protocol_module, "BULK_DATA", False)
    monkeypatch.setattr(bulk_data, "read_body", refuse)
    _, _, seen, _ = _both([_HEAD, b"a\r\n..b\r\n.\r\nQUIT\r\n"])
    assert seen[0][3] == b"a\r\n.b\r\n"


_BODY_BITS = st.sampled_from(
    [
        b"a",
        b".",
        b"..",
        b"\r",
        b"\n",
        b"\r\n",
        b"\r\n.",
        b".\r\n",
        b"\r\n..\r\n",
        b"\n.\n",
        b"\r.\r",
        b"\n.\r\n",
        b"\r\n.\n",
        b"\xc3\xa9\xff",
        b"QUIT\r\n",
        b"\r\n.\r\nRSET\r\nMAIL FROM:<c@d>\r\nRCPT TO:<e@f>\r\nDATA\r\n",
    ]
) | st.integers(1, 24).map(lambda n: b"x" * n)


@settings(max_examples=800, deadline=None, derandomize=True)
@given(
    bits=st.lists(_BODY_BITS, max_size=40),
    cuts=st.lists(st.integers(1, 40), min_size=1, max_size=30),
    aligned=st.booleans(),
    ending=st.sampled_from(["quit", "quit", "eof", "lost"]),
    max_line_length=st.integers(15, 30),  # the commands must fit
    size=st.sampled_from([None, 0]) | st.integers(-30, 30),
    decode_data=st.booleans(),
    utf8=st.booleans(),
)
def test_bulk_reader_agrees_with_aiosmtpd(
    bits: list[bytes],
    cuts: list[int],
    aligned: bool,
    ending: str,
    max_line_length: int,
    size: int | None,
    decode_data: bool,
    utf8: bool,
) -> None:
    """Replies, log, what the handler got and what is left unread: as aiosmtpd's line-by-line reader."""
    head = b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nDATA\r\n"
    tail = [b"\r\n.\r\nQUIT\r\n"] if ending == "quit" else []
    if aligned:  # reads end between the bits (a CR apart from its LF, a dot apart from its line...)
        chunks = [head]
        for i, bit in enumerate([*bits, *tail]):
            if cuts[i % len(cuts)] < 20:
                chunks.append(b"")
            chunks[-1] += bit
    else:  # reads of these sizes, wherever they fall
        stream = b"".join([head, *bits, *tail])
        chunks, at = [], 0
        while at < len(stream):
            size = cuts[len(chunks) % len(cuts)]
            chunks.append(stream[at : at + size])
            at += size
    _both(
        chunks,
        ending,
        max_line_length=max_line_length,
        # mostly about as long as the body, to cross the limit on its last lines
        data_size_limit=size if not size else max(1, len(b"".join(bits)) + size),
        decode_data=decode_data,
        enable_SMTPUTF8=utf8,
    )
