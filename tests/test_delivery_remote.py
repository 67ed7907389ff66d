"""Remote delivery against real SMTP servers on loopback: Postfix's smtp-sink (what
arrives, per-command 4xx/5xx, MX fallback) and aiosmtpd in-process (the exact bytes
on the wire, per-recipient replies, STARTTLS)."""

from __future__ import annotations

import asyncio
import re
import ssl
import subprocess
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import Envelope, Session
from peers import free_port, require, smtp_sink

from spoolfs.delivery.remote import SessionCache, deliver, normalize_crlf
from spoolfs.delivery.results import RcptResult

T = TypeVar("T")
HELO = "out.spoolfs.test"
TIMEOUT = 5.0

# bare LF, a bare CR, CRLF, lines starting with '.', no line ending at the end
MESSAGE = (
    b"From: a@example.org\n"
    b"To: x@remote.test\r\n"
    b"Subject: hygiene\n"
    b"\n"
    b"line one\n"
    b"bare\rcr\r\n"
    b".dot line\n"
    b"..two dots\n"
    b".\n"
    b"last line without newline"
)
ON_THE_WIRE = (
    b"From: a@example.org\r\n"
    b"To: x@remote.test\r\n"
    b"Subject: hygiene\r\n"
    b"\r\n"
    b"line one\r\n"
    b"bare\r\n"
    b"cr\r\n"
    b".dot line\r\n"
    b"..two dots\r\n"
    b".\r\n"
    b"last line without newline\r\n"
)


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, 30)

    return asyncio.run(bounded())


def send(
    hosts: list[tuple[str, int]], recipients: list[str], data: bytes = MESSAGE, sender: str = "a@example.org"
) -> list[RcptResult]:
    return run(deliver(hosts, sender, recipients, data, helo=HELO, timeout=TIMEOUT))


def body_of(dumped: bytes) -> bytes:
    """The message as smtp-sink wrote it: after its own 3-line Received header."""
    match = re.search(rb"\nReceived: [^\n]*\n\t[^\n]*\n\t[^\n]*\n", dumped)
    assert match, dumped
    return dumped[match.end() :]


def test_normalize_crlf() -> None:
    assert normalize_crlf(b"a\nb\rc\r\nd") == b"a\r\nb\r\nc\r\nd\r\n"
    assert normalize_crlf(b"a\r\r\n") == b"a\r\n\r\n"
    assert normalize_crlf(b"") == b"\r\n"
    assert normalize_crlf(ON_THE_WIRE) == ON_THE_WIRE


# --- smtp-sink ------------------------------------------------------------------------


def test_delivers_everything_intact_to_an_accepting_server(tmp_path: Path) -> None:
    with smtp_sink(dump_file=tmp_path / "sink.dump") as sink:
        results = send([(sink.host, sink.port)], ["x@remote.test", "y@remote.test"])
        [dumped] = sink.wait_for_messages(1)
    assert [r.result for r in results] == ["delivered", "delivered"]
    assert [r.recipient for r in results] == ["x@remote.test", "y@remote.test"]
    for r in results:
        assert r.code == 250
        assert r.response == "250 2.0.0 Ok"
        assert r.host == sink.host
    assert b"X-Helo-Args: out.spoolfs.test\n" in dumped
    assert b"X-Mail-Args: <a@example.org>\n" in dumped
    assert re.findall(rb"X-Rcpt-Args: (.*)\n", dumped) == [b"<x@remote.test>", b"<y@remote.test>"]
    # smtp-sink stores lines with LF and drops a bare CR inside a line ("barecr"):
    # "bare" / "cr" as two lines shows the CR went out as CRLF; dots un-stuffed intact.
    assert body_of(dumped) == ON_THE_WIRE.replace(b"\r\n", b"\n") + b"\n"
    assert (tmp_path / "sink.dump").is_file() and not (tmp_path / "sink.dump").is_symlink()


def test_null_sender_is_sent_as_empty_path(tmp_path: Path) -> None:
    with smtp_sink(dump_file=tmp_path / "sink.dump") as sink:
        results = send([(sink.host, sink.port)], ["x@remote.test"], sender="")
        [dumped] = sink.wait_for_messages(1)
    assert results[0].result == "delivered"
    assert b"X-Mail-Args: <>\n" in dumped


def test_4xx_at_rcpt_defers_and_sends_no_data(tmp_path: Path) -> None:
    with smtp_sink(reply_4xx=["RCPT"], dump_file=tmp_path / "sink.dump") as sink:
        results = send([(sink.host, sink.port)], ["x@remote.test", "y@remote.test"])
        assert sink.messages() == []
    assert [r.result for r in results] == ["deferred", "deferred"]
    assert {r.code for r in results} == {450}
    assert results[0].response == "450 4.3.0 Error: command failed"
    assert results[0].host == sink.host


def test_5xx_at_rcpt_fails(tmp_path: Path) -> None:
    with smtp_sink(reply_5xx=["RCPT"], dump_file=tmp_path / "sink.dump") as sink:
        results = send([(sink.host, sink.port)], ["x@remote.test"])
        assert sink.messages() == []
    assert results == [
        RcptResult("x@remote.test", "failed", 500, "500 5.3.0 Error: command failed", sink.host)
    ]


@pytest.mark.parametrize("command", ["DATA", "."])
def test_5xx_at_data_fails_all(command: str) -> None:
    with smtp_sink(reply_5xx=[command]) as sink:
        results = send([(sink.host, sink.port)], ["x@remote.test", "y@remote.test"])
    assert [(r.result, r.code) for r in results] == [("failed", 500), ("failed", 500)]


@pytest.mark.parametrize("command", ["DATA", "."])
def test_4xx_at_data_defers_all(command: str) -> None:
    with smtp_sink(reply_4xx=[command]) as sink:
        results = send([(sink.host, sink.port)], ["x@remote.test", "y@remote.test"])
    assert [(r.result, r.code) for r in results] == [("deferred", 450), ("deferred", 450)]


def test_first_mx_down_second_takes_it(tmp_path: Path) -> None:
    port = free_port("127.0.0.2")
    with smtp_sink("127.0.0.2", port, dump_file=tmp_path / "sink.dump") as sink:
        # nothing listens on 127.0.0.5:port
        results = send([("127.0.0.5", port), ("127.0.0.2", port)], ["x@remote.test"])
        sink.wait_for_messages(1)
    assert [(r.result, r.host) for r in results] == [("delivered", "127.0.0.2")]


def test_all_hosts_down_defers_with_the_last_error() -> None:
    port = free_port("127.0.0.5")
    results = send([("127.0.0.5", port), ("127.0.0.6", port)], ["x@remote.test", "y@remote.test"])
    assert [r.result for r in results] == ["deferred", "deferred"]
    for r in results:
        assert r.code == 451
        assert r.host == "127.0.0.6"
        assert r.response.startswith(f"451 4.4.1 connect to 127.0.0.6:{port} failed")


def test_no_hosts_defers() -> None:
    [result] = send([], ["x@remote.test"])
    assert (result.result, result.code) == ("deferred", 451)


def test_rejected_greeting_moves_on_to_the_next_host(tmp_path: Path) -> None:
    port = free_port("127.0.0.2")
    with (
        smtp_sink("127.0.0.2", port, reply_5xx=["CONNECT"]),
        smtp_sink("127.0.0.3", port, dump_file=tmp_path / "sink.dump") as good,
    ):
        results = send([("127.0.0.2", port), ("127.0.0.3", port)], ["x@remote.test"])
        good.wait_for_messages(1)
    assert [(r.result, r.host) for r in results] == [("delivered", "127.0.0.3")]


def test_5xx_to_mail_from_moves_on_then_fails_all_on_the_last_host() -> None:
    port = free_port("127.0.0.2")
    with smtp_sink("127.0.0.2", port, reply_5xx=["MAIL"]), smtp_sink("127.0.0.3", port):
        # refused by the first host, taken by the second
        results = send([("127.0.0.2", port), ("127.0.0.3", port)], ["x@remote.test"])
        assert [(r.result, r.host) for r in results] == [("delivered", "127.0.0.3")]
        # the first host is down, the last one refuses the sender: permanent for all
        results = send([("127.0.0.5", port), ("127.0.0.2", port)], ["x@remote.test", "y@remote.test"])
        assert [(r.result, r.code, r.host) for r in results] == [
            ("failed", 500, "127.0.0.2"),
            ("failed", 500, "127.0.0.2"),
        ]
        # the sender is refused first, then the last host is down: the last error decides
        results = send([("127.0.0.2", port), ("127.0.0.5", port)], ["x@remote.test"])
        assert [(r.result, r.code, r.host) for r in results] == [("deferred", 451, "127.0.0.5")]


def test_4xx_to_mail_from_on_the_last_host_defers() -> None:
    with smtp_sink(reply_4xx=["MAIL"]) as sink:
        results = send([(sink.host, sink.port)], ["x@remote.test"])
    assert [(r.result, r.code) for r in results] == [("deferred", 450)]


def test_421_at_rcpt_moves_on_to_the_next_host(tmp_path: Path) -> None:
    port = free_port("127.0.0.2")
    with (
        smtp_sink("127.0.0.2", port, reply_421=["RCPT"]),
        smtp_sink("127.0.0.3", port, dump_file=tmp_path / "sink.dump") as good,
    ):
        results = send([("127.0.0.2", port), ("127.0.0.3", port)], ["x@remote.test", "y@remote.test"])
        good.wait_for_messages(1)
    assert [(r.result, r.host) for r in results] == [("delivered", "127.0.0.3")] * 2


def test_connection_lost_after_the_data_defers_and_tries_no_other_host(tmp_path: Path) -> None:
    port = free_port("127.0.0.2")
    with (
        smtp_sink("127.0.0.2", port, disconnect=["."]),
        smtp_sink("127.0.0.3", port, dump_file=tmp_path / "sink.dump") as other,
    ):
        results = send([("127.0.0.2", port), ("127.0.0.3", port)], ["x@remote.test"])
        # the first host may have the message: sending it elsewhere now would duplicate it
        assert other.messages() == []
    [result] = results
    assert (result.result, result.code, result.host) == ("deferred", 451, "127.0.0.2")
    assert result.response.startswith("451 4.4.2 lost connection with 127.0.0.2 during DATA")


def test_non_ascii_recipient_without_smtputf8_fails_alone(tmp_path: Path) -> None:
    with smtp_sink(dump_file=tmp_path / "sink.dump") as sink:
        results = send([(sink.host, sink.port)], ["jürgen@remote.test", "x@remote.test"])
        [dumped] = sink.wait_for_messages(1)
    assert results[0].result == "failed"
    assert results[0].response.startswith("553 5.6.7 SMTPUTF8 is required")
    assert results[1].result == "delivered"
    assert re.findall(rb"X-Rcpt-Args: (.*)\n", dumped) == [b"<x@remote.test>"]


# --- aiosmtpd: the bytes on the wire, per-recipient replies, STARTTLS ----------------


@dataclass
class Recorder:
    """An aiosmtpd handler keeping what arrived; recipients in `replies` get that reply."""

    replies: dict[str, str] = field(default_factory=dict)
    received: list[tuple[str, list[str], bytes, bool]] = field(default_factory=list)
    mail_options: list[list[str]] = field(default_factory=list)
    # (EHLO argument, over TLS) for every EHLO, in order
    ehlo: list[tuple[str, bool]] = field(default_factory=list)

    async def handle_EHLO(
        self, server: SMTPServer, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        self.ehlo.append((hostname, session.ssl is not None))
        return responses

    async def handle_RCPT(
        self, server: SMTPServer, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address in self.replies:
            return self.replies[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        assert envelope.original_content is not None
        self.mail_options.append(list(envelope.mail_options))
        self.received.append(
            (
                str(envelope.mail_from),
                list(envelope.rcpt_tos),
                bytes(envelope.original_content),
                session.ssl is not None,
            )
        )
        return "250 2.0.0 queued as TEST"


@asynccontextmanager
async def aiosmtpd_server(
    handler: Recorder, *, tls_context: ssl.SSLContext | None = None, smtputf8: bool = False
) -> AsyncIterator[int]:
    loop = asyncio.get_running_loop()

    def factory() -> SMTPServer:
        return SMTPServer(
            handler,
            hostname="aiosmtpd.test",
            tls_context=tls_context,
            require_starttls=False,
            enable_SMTPUTF8=smtputf8,
            decode_data=False,
        )

    server = await loop.create_server(factory, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), 5)


def with_server(
    handler: Recorder,
    recipients: list[str],
    *,
    tls_context: ssl.SSLContext | None = None,
    smtputf8: bool = False,
    data: bytes = MESSAGE,
) -> list[RcptResult]:
    async def scenario() -> list[RcptResult]:
        async with aiosmtpd_server(handler, tls_context=tls_context, smtputf8=smtputf8) as port:
            return await deliver(
                [("127.0.0.1", port)], "a@example.org", recipients, data, helo=HELO, timeout=TIMEOUT
            )

    return run(scenario())


def test_wire_bytes_are_crlf_and_dot_stuffed_exactly_once() -> None:
    handler = Recorder()
    results = with_server(handler, ["x@remote.test"])
    assert [r.result for r in results] == ["delivered"]
    assert results[0].response == "250 2.0.0 queued as TEST"
    # aiosmtpd reads CRLF lines and removes one leading dot: what it has is exactly
    # the normalised message (a double stuffing would leave '..dot line').
    [(_, _, content, _)] = handler.received
    assert content == ON_THE_WIRE


def test_8bit_body_is_declared() -> None:
    handler = Recorder()
    results = with_server(handler, ["x@remote.test"], data="Subject: é\n\nné\n".encode())
    assert results[0].result == "delivered"
    assert "BODY=8BITMIME" in handler.mail_options[0]
    assert handler.received[0][2] == "Subject: é\r\n\r\nné\r\n".encode()


def test_each_recipient_gets_its_own_reply_and_data_reply_goes_to_the_accepted() -> None:
    handler = Recorder(
        replies={
            "busy@remote.test": "452 4.2.2 Mailbox full",
            "gone@remote.test": "550 5.1.1 <gone@remote.test>: Recipient address rejected",
        }
    )
    results = with_server(
        handler, ["ok@remote.test", "busy@remote.test", "gone@remote.test", "ok2@remote.test"]
    )
    assert [(r.recipient, r.result, r.code) for r in results] == [
        ("ok@remote.test", "delivered", 250),
        ("busy@remote.test", "deferred", 452),
        ("gone@remote.test", "failed", 550),
        ("ok2@remote.test", "delivered", 250),
    ]
    assert results[2].response == "550 5.1.1 <gone@remote.test>: Recipient address rejected"
    [(_, rcpts, _, _)] = handler.received
    assert rcpts == ["ok@remote.test", "ok2@remote.test"]


def test_smtputf8_is_used_when_needed_and_offered() -> None:
    handler = Recorder()
    results = with_server(handler, ["jürgen@remote.test"], smtputf8=True)
    assert [r.result for r in results] == ["delivered"]
    assert "SMTPUTF8" in handler.mail_options[0]
    assert handler.received[0][1] == ["jürgen@remote.test"]


def test_smtputf8_is_not_used_when_not_needed() -> None:
    handler = Recorder()
    with_server(handler, ["x@remote.test"], smtputf8=True)
    assert "SMTPUTF8" not in handler.mail_options[0]


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    openssl = require("openssl", "openssl")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
            *("-subj", "/CN=mx.remote.test", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def server_context(certificate: tuple[Path, Path] | None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if certificate is not None:
        context.load_cert_chain(*certificate)
    return context


def test_starttls_is_used_when_offered_even_with_an_unverifiable_certificate(
    certificate: tuple[Path, Path],
) -> None:
    handler = Recorder()
    results = with_server(handler, ["x@remote.test"], tls_context=server_context(certificate))
    assert [r.result for r in results] == ["delivered"]
    [(_, _, content, over_tls)] = handler.received
    assert over_tls  # self-signed for another name: opportunistic TLS does not verify
    assert handler.ehlo == [(HELO, False), (HELO, True)]  # EHLO again after STARTTLS
    assert content == ON_THE_WIRE


def test_failed_tls_handshake_reconnects_without_tls() -> None:
    handler = Recorder()
    # STARTTLS offered, but a server context without a certificate cannot complete a handshake
    results = with_server(handler, ["x@remote.test"], tls_context=server_context(None))
    assert [r.result for r in results] == ["delivered"]
    [(_, _, content, over_tls)] = handler.received
    assert not over_tls
    assert content == ON_THE_WIRE
    # first connection: EHLO, STARTTLS fails; second connection: EHLO, no STARTTLS
    assert handler.ehlo == [(HELO, False), (HELO, False)]


# --- connection reuse -------------------------------------------------------------


@dataclass
class OneTransactionPerSession(Recorder):
    """Answers 421 to a second MAIL FROM on one connection, as a server does
    that has closed an idle session (without the client noticing yet)."""

    seen: set[int] = field(default_factory=set)

    async def handle_MAIL(
        self, server: SMTPServer, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if id(session) in self.seen:
            return "421 4.4.2 aiosmtpd.test idle too long, closing"
        self.seen.add(id(session))
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"


def deliver_three(handler: Recorder, cache: SessionCache) -> list[list[RcptResult]]:
    async def scenario() -> list[list[RcptResult]]:
        async with aiosmtpd_server(handler) as port:
            out = []
            for rcpts in (["x@remote.test"], ["refused@remote.test"], ["y@remote.test"]):
                out.append(
                    await deliver(
                        [("127.0.0.1", port)],
                        "a@example.org",
                        rcpts,
                        MESSAGE,
                        helo=HELO,
                        timeout=TIMEOUT,
                        cache=cache,
                    )
                )
            await cache.close()
            return out

    return run(scenario())


def test_a_session_is_reused_for_the_next_messages_to_the_same_host() -> None:
    handler = Recorder(replies={"refused@remote.test": "550 5.1.1 no such user"})
    cache = SessionCache()
    results = deliver_three(handler, cache)
    assert [[r.result for r in rs] for rs in results] == [["delivered"], ["failed"], ["delivered"]]
    assert len(handler.ehlo) == 1  # one connection, three transactions (the second ended by RSET)
    assert [rcpts for _, rcpts, _, _ in handler.received] == [["x@remote.test"], ["y@remote.test"]]
    assert (cache.opened, cache.reused, len(cache)) == (1, 2, 0)


def test_a_stale_cached_session_is_replaced_and_nothing_arrives_twice() -> None:
    handler = OneTransactionPerSession(replies={"refused@remote.test": "550 5.1.1 no such user"})
    cache = SessionCache()
    results = deliver_three(handler, cache)
    assert [[r.result for r in rs] for rs in results] == [["delivered"], ["failed"], ["delivered"]]
    # every reuse met a 421 at MAIL FROM, so each message went on a fresh connection
    assert len(handler.ehlo) == 3 and cache.opened == 3
    assert [rcpts for _, rcpts, _, _ in handler.received] == [["x@remote.test"], ["y@remote.test"]]


def test_an_idle_session_expires() -> None:
    handler = Recorder()

    async def scenario() -> tuple[int, int]:
        cache = SessionCache(idle_time=0.05)
        async with aiosmtpd_server(handler) as port:
            for _ in range(2):
                await deliver(
                    [("127.0.0.1", port)],
                    "a@example.org",
                    ["x@remote.test"],
                    MESSAGE,
                    helo=HELO,
                    timeout=TIMEOUT,
                    cache=cache,
                )
                await asyncio.sleep(0.1)
            kept = len(cache)
            await cache.expire()
            return kept, len(cache)

    kept, left = run(scenario())
    assert (kept, left) == (1, 0)
    assert len(handler.ehlo) == 2  # the first session had idled too long to be used again
