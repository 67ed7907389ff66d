"""The scanner clients and the Scanner: real clamd and spamd on loopback,
and small fake servers for what real ones will not do on demand (hang,
answer nonsense, prove that both round trips overlap)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from peers import SIGNATURES, Clamd, Spamd, clamd, eicar, free_port, gtube, spamd

from events.errors import ConfigError
from spoolfs.config import ScanConfig, load_config
from spoolfs.scan import ClamdClient, Scanner, ScannerError, SpamdClient
from spoolfs.scan.clamd import parse_answer as clamd_answer
from spoolfs.scan.spamd import parse_answer as spamd_answer

HAM = (
    b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: lunch\r\n"
    b"Date: Mon, 6 May 2024 07:08:09 +0000\r\nMessage-ID: <lunch-1@example.org>\r\n\r\n"
    b"Lunch at noon? The usual place.\r\n"
)


def plain(body: bytes) -> bytes:
    return b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: test\r\n\r\n" + body + b"\r\n"


def with_attachment(payload: bytes, name: str = "tool.com") -> bytes:
    """A MIME message carrying `payload` as a base64 attachment (the raw bytes never appear)."""
    encoded = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    return (
        b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: the file\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
        b"--b1\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n"
        b"--b1\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
        + f'Content-Disposition: attachment; filename="{name}"\r\n\r\n'.encode()
        + encoded
        + b"--b1--\r\n"
    )


@pytest.fixture(scope="module")
def clamd_peer() -> Iterator[Clamd]:
    with clamd(SIGNATURES) as peer:
        yield peer


@pytest.fixture(scope="module")
def spamd_peer() -> Iterator[Spamd]:
    with spamd() as peer:
        yield peer


def run(coro: Awaitable[object]) -> object:
    async def main() -> object:
        return await coro

    return asyncio.run(main())


# --- clamd -------------------------------------------------------------------------


def test_clamd_clean_and_eicar_in_a_plain_body(clamd_peer: Clamd) -> None:
    client = ClamdClient(clamd_peer.address, timeout=10)
    assert run(client.scan(HAM)) == ""
    assert run(client.scan(plain(eicar()))) == "Spoolfs.Test.EICAR.UNOFFICIAL"


def test_clamd_finds_eicar_in_a_base64_attachment(clamd_peer: Clamd) -> None:
    message = with_attachment(eicar())
    assert eicar() not in message
    assert run(ClamdClient(clamd_peer.address, timeout=10).scan(message)) == "Spoolfs.Test.EICAR.UNOFFICIAL"


def test_clamd_over_its_unix_socket_and_in_many_chunks(clamd_peer: Clamd) -> None:
    big = plain(b"x" * 300_000 + eicar())  # several 64 KB chunks, the signature in the last
    for address in (str(clamd_peer.socket), f"unix:{clamd_peer.socket}"):
        client = ClamdClient(address, timeout=10)
        run(client.ping())
        assert run(client.scan(HAM)) == ""
        assert run(client.scan(big)) == "Spoolfs.Test.EICAR.UNOFFICIAL"


def test_clamd_answers() -> None:
    assert clamd_answer("stream: OK") == ""
    assert clamd_answer("stream: Win.Test.EICAR_HDB-1 FOUND") == "Win.Test.EICAR_HDB-1"
    with pytest.raises(ScannerError, match=r"clamd: could not scan: INSTREAM size limit exceeded\. ERROR"):
        clamd_answer("INSTREAM size limit exceeded. ERROR")
    with pytest.raises(ScannerError):
        clamd_answer("stream:  FOUND")


# --- spamd -------------------------------------------------------------------------


def test_spamd_flags_gtube_with_score_threshold_and_rules(spamd_peer: Spamd) -> None:
    client = SpamdClient(spamd_peer.address, timeout=20)
    run(client.ping())
    result = run(client.check(plain(gtube())))
    assert result.is_spam and result.score >= 1000 and result.threshold == 5.0  # type: ignore[attr-defined]
    assert "GTUBE" in result.rules  # type: ignore[attr-defined]
    ham = run(client.check(HAM))
    assert not ham.is_spam and ham.score < 5.0 and "GTUBE" not in ham.rules  # type: ignore[attr-defined]


def test_spamd_message_without_a_final_newline(spamd_peer: Spamd) -> None:
    """spamd reads the body line-wise; the client's half-close ends the last line."""
    result = run(SpamdClient(spamd_peer.address, timeout=20).check(plain(gtube()) + b"no newline at the end"))
    assert result.is_spam  # type: ignore[attr-defined]


def test_spamd_answers() -> None:
    r = spamd_answer(b"SPAMD/1.1 0 EX_OK\r\nContent-length: 9\r\nSpam: True ; 1005.2 / 5.0\r\n\r\nGTUBE,A_B")
    assert (r.is_spam, r.score, r.threshold, r.rules) == (True, 1005.2, 5.0, ["GTUBE", "A_B"])
    r = spamd_answer(b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; -0.5 / 5.0\r\n\r\n")
    assert (r.is_spam, r.score, r.rules) == (False, -0.5, [])
    with pytest.raises(ScannerError, match="spamd: error 76 Bad header line"):
        spamd_answer(b"SPAMD/1.0 76 Bad header line: (EOF)\r\n\r\n")
    for bad in (b"", b"HTTP/1.1 200 OK\r\n\r\n", b"SPAMD/1.1 0 EX_OK\r\nSpam: maybe\r\n\r\n"):
        with pytest.raises(ScannerError):
            spamd_answer(bad)


# --- the Scanner, with real peers ---------------------------------------------------


def test_scanner_verdicts(clamd_peer: Clamd, spamd_peer: Spamd) -> None:
    scanner = Scanner(
        ClamdClient(clamd_peer.address, timeout=10), SpamdClient(spamd_peer.address, timeout=20)
    )
    clean = run(scanner.scan(HAM))
    assert clean.kind == "clean" and clean.verdict.checked == ["clamd", "spamd"]  # type: ignore[attr-defined]
    spam = run(scanner.scan(plain(gtube())))
    assert spam.kind == "spam" and spam.verdict.threshold == 5.0 and "GTUBE" in spam.verdict.rules  # type: ignore[attr-defined]
    virus = run(scanner.scan(with_attachment(eicar())))
    assert virus.kind == "virus" and virus.verdict.virus == "Spoolfs.Test.EICAR.UNOFFICIAL"  # type: ignore[attr-defined]
    both = run(scanner.scan(plain(gtube() + b"\r\n" + eicar())))
    assert both.kind == "virus" and both.verdict.score >= 1000  # type: ignore[attr-defined]


def test_threshold_override_and_spam_size_limit(spamd_peer: Spamd) -> None:
    ham_score = run(SpamdClient(spamd_peer.address).check(HAM)).score  # type: ignore[attr-defined]
    strict = Scanner(None, SpamdClient(spamd_peer.address, timeout=20), spam_threshold=ham_score)
    result = run(strict.scan(HAM))
    assert result.kind == "spam" and result.verdict.threshold == ham_score  # type: ignore[attr-defined]
    lenient = Scanner(None, SpamdClient(spamd_peer.address, timeout=20), spam_threshold=2000.0)
    assert run(lenient.scan(plain(gtube()))).kind == "clean"  # type: ignore[attr-defined]
    small = Scanner(None, SpamdClient(spamd_peer.address, timeout=20), spam_max_size=100)
    skipped = run(small.scan(plain(gtube())))
    assert skipped.kind == "clean" and skipped.verdict.checked == []  # type: ignore[attr-defined]


def test_one_scanner_down(clamd_peer: Clamd, spamd_peer: Spamd) -> None:
    dead = f"127.0.0.1:{free_port()}"
    no_spamd = Scanner(ClamdClient(clamd_peer.address, timeout=10), SpamdClient(dead, timeout=5))
    result = run(no_spamd.scan(HAM))
    assert result.kind == "unavailable" and result.failed == ["spamd"]  # type: ignore[attr-defined]
    assert f"spamd: cannot connect to {dead}" in result.reason  # type: ignore[attr-defined]
    # a virus found by clamd stands: it is quarantined, not refused
    assert run(no_spamd.scan(plain(eicar()))).kind == "virus"  # type: ignore[attr-defined]
    no_clamd = Scanner(ClamdClient(dead, timeout=5), SpamdClient(spamd_peer.address, timeout=20))
    assert run(no_clamd.scan(HAM)).kind == "unavailable"  # type: ignore[attr-defined]
    assert run(no_clamd.scan(plain(gtube()))).kind == "spam"  # type: ignore[attr-defined]
    socket_gone = Scanner(ClamdClient("/nonexistent/clamd.sock", timeout=5), None)
    assert "cannot connect to /nonexistent/clamd.sock" in run(socket_gone.scan(HAM)).reason  # type: ignore[attr-defined]


# --- fake servers ------------------------------------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def fake(handler: Handler) -> AsyncIterator[str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


def test_a_silent_scanner_times_out() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    async def main() -> None:
        async with fake(silent) as address:
            scanner = Scanner(ClamdClient(address, timeout=0.3), SpamdClient(address, timeout=0.3))
            result = await scanner.scan(HAM)
            assert result.kind == "unavailable"
            assert sorted(result.failed) == ["clamd", "spamd"]
            assert f"no answer from {address} within 0.3 s" in result.reason

    asyncio.run(main())


def test_nonsense_and_early_close_are_failures_not_clean() -> None:
    async def nonsense(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(10)
        writer.write(b"hello\0")
        await writer.drain()
        writer.close()

    async def hangup(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async def main() -> None:
        async with fake(nonsense) as a, fake(hangup) as b:
            for address in (a, b):
                result = await Scanner(ClamdClient(address, timeout=5), SpamdClient(address, timeout=5)).scan(
                    HAM
                )
                assert result.kind == "unavailable", address
                assert sorted(result.failed) == ["clamd", "spamd"]

    asyncio.run(main())


def test_both_round_trips_are_in_flight_at_once() -> None:
    """Each fake answers only once the other has received the whole message:
    a scanner that asked one after the other would time out."""
    got_clamd, got_spamd = asyncio.Event(), asyncio.Event()

    async def fake_clamd(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.readexactly(10) == b"zINSTREAM\0"
        while size := int.from_bytes(await reader.readexactly(4), "big"):
            await reader.readexactly(size)
        got_clamd.set()
        await got_spamd.wait()
        writer.write(b"stream: OK\0")
        await writer.drain()
        writer.close()

    async def fake_spamd(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.split(b"Content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        got_spamd.set()
        await got_clamd.wait()
        writer.write(b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; 0.1 / 5.0\r\n\r\nRULE_A")
        await writer.drain()
        writer.close()

    async def main() -> None:
        async with fake(fake_clamd) as c, fake(fake_spamd) as s:
            result = await Scanner(ClamdClient(c, timeout=3), SpamdClient(s, timeout=3)).scan(HAM)
            assert result.kind == "clean", result.reason
            assert result.verdict.rules == ["RULE_A"]

    asyncio.run(main())


# --- configuration -----------------------------------------------------------------


def test_scan_config_defaults() -> None:
    scan = load_config(data_dir="/tmp/spoolfs-unused").scan
    assert scan == ScanConfig()
    assert (scan.enabled, scan.scan_incoming, scan.on_failure, scan.retention_days) == (
        False,
        False,
        "tempfail",
        30,
    )
    assert scan.spam_threshold is None


def test_scan_config_values(tmp_path: Path) -> None:
    cfg = tmp_path / "spool.toml"
    cfg.write_text(
        '[scan]\nenabled = true\nclamd = "/run/clamav/clamd.ctl"\nspamd = "127.0.0.1:10783"\n'
        'spam_threshold = 3.5\ntimeout = 5.0\nscan_incoming = true\non_failure = "accept"\n'
        "retention_days = 7\n"
    )
    scan = load_config(cfg, data_dir=str(tmp_path)).scan
    assert scan == ScanConfig(
        enabled=True,
        clamd="/run/clamav/clamd.ctl",
        spamd="127.0.0.1:10783",
        spam_threshold=3.5,
        timeout=5.0,
        scan_incoming=True,
        on_failure="accept",
        retention_days=7,
    )


@pytest.mark.parametrize(
    ("text", "key", "why"),
    [
        ("retention_days = 31", "scan.retention_days", "between 1 and 30"),
        ("retention_days = 0", "scan.retention_days", "between 1 and 30"),
        ('on_failure = "bounce"', "scan.on_failure", ""),
        ('clamd = "localhost"', "scan.clamd", "is not HOST:PORT"),
        ('spamd = "host:99999"', "scan.spamd", "is not HOST:PORT"),
        ("timeout = 0", "scan.timeout", "greater than 0"),
        ('enabled = true\nclamd = ""\nspamd = ""', "scan.enabled", "needs scan.clamd or scan.spamd"),
        ("colour = 1", "scan.colour", "unknown key"),
    ],
)
def test_bad_scan_config_names_the_key(tmp_path: Path, text: str, key: str, why: str) -> None:
    cfg = tmp_path / "spool.toml"
    cfg.write_text(f"[scan]\n{text}\n")
    with pytest.raises(ConfigError) as info:
        load_config(cfg, data_dir=str(tmp_path))
    assert f"{cfg}: {key}: " in str(info.value) and why in str(info.value)
    assert "\n" not in str(info.value)
