"""Deliver one message to remote SMTP servers: one transaction, many recipients.

Failure rules:
- Hosts are tried in order. A connection failure or timeout, a reply other
  than 2xx to the greeting, EHLO/HELO or MAIL FROM, a 421 at any point, or
  a lost connection before the DATA content is sent: that host is left and
  the next one tried. When no host is left, the last host's error decides for
  every recipient: a 5xx to MAIL FROM fails them all (permanent); anything
  else defers them all (temporary).
- RCPT TO, per recipient: 2xx accepted, 4xx deferred, 5xx failed, anything
  else deferred. No recipient accepted: RSET and QUIT, no DATA.
- The DATA reply (to the command or to the final dot) applies to every
  accepted recipient: 2xx delivered, 5xx failed, anything else deferred. A
  connection lost or a timeout during DATA defers the accepted recipients and
  no other host is tried (the message may have arrived; a retry later may
  deliver it twice, which is better than losing it).
- SMTPUTF8: an envelope address that is not ASCII needs it; when the server
  does not offer it, those recipients (or all, for the sender) fail with
  553 5.6.7.
- Opportunistic STARTTLS (Postfix's `may`): tried when offered, the
  certificate is not verified; a failed handshake reconnects to the same host
  without TLS. A refusal (4xx/5xx to STARTTLS) goes on in plain text.
- Anything unexpected is temporary: the recipients are deferred, never dropped.

Connection reuse (Postfix's connection cache): with a `SessionCache`, a
session whose transaction ended cleanly (the reply to the final dot, or RSET
after no recipient was taken) is kept for the next message to the same host
instead of QUIT. A cached session is used for at most `reuse_time` seconds
from its connect and idles at most `idle_time` seconds. A reused session
that fails before DATA (the server closed it while idle, a 421) is closed
and the transaction is tried once more on a fresh connection to that host;
nothing was sent yet, so nothing can arrive twice.

Outbound hygiene: bare CR and bare LF become CRLF and the data ends with CRLF
(`normalize_crlf`). Dot-stuffing is done exactly once, by aiosmtplib: its
`SMTP.data()` (SMTPProtocol.execute_data_command) normalises line endings the
same way (a no-op on our already normalised bytes), doubles every leading '.'
and appends the terminating ".\\r\\n". We therefore never stuff ourselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import ssl
import time
from dataclasses import dataclass, field

import aiosmtplib
from aiosmtplib import (
    SMTPConnectError,
    SMTPConnectTimeoutError,
    SMTPDataError,
    SMTPHeloError,
    SMTPResponseException,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)

from spoolfs.delivery.results import RcptResult, Result, one_line, reply, result_for_code

_LINE_ENDINGS = re.compile(rb"\r\n|\r|\n")
_HEADER_END = re.compile(rb"\r\n\r\n")
_SERVICE_CLOSING = 421
_QUIT_TIMEOUT = 5.0


def normalize_crlf(data: bytes) -> bytes:
    """Every bare CR and bare LF becomes CRLF; the result ends with CRLF."""
    crlf = data.count(b"\r\n")
    # The common case (a body received over SMTP) is already clean: three
    # counting passes are much cheaper than a regex that copies the body.
    if data.count(b"\r") != crlf or data.count(b"\n") != crlf:
        data = _LINE_ENDINGS.sub(b"\r\n", data)
    return data if data.endswith(b"\r\n") else data + b"\r\n"


@dataclass
class _Cached:
    smtp: aiosmtplib.SMTP
    connected_at: float
    idle_since: float
    loop: asyncio.AbstractEventLoop


@dataclass
class SessionCache:
    """Idle SMTP sessions by (host, port), for the next message to the same host."""

    idle_time: float = 2.0
    reuse_time: float = 300.0
    _idle: dict[tuple[str, int], list[_Cached]] = field(default_factory=dict)
    _born: dict[int, float] = field(default_factory=dict)
    reused: int = 0
    opened: int = 0

    def take(self, host: str, port: int) -> aiosmtplib.SMTP | None:
        now = time.monotonic()
        sessions = self._idle.get((host, port))
        while sessions:
            cached = sessions.pop()  # the most recently used: least likely to have timed out
            if self._fresh(cached, now):
                self.reused += 1
                return cached.smtp
            self._drop(cached.smtp)
        return None

    def opened_now(self, smtp: aiosmtplib.SMTP) -> None:
        self.opened += 1
        self._born[id(smtp)] = time.monotonic()

    def put(self, host: str, port: int, smtp: aiosmtplib.SMTP) -> bool:
        """Keep a session whose transaction ended cleanly; False if it is too old to keep."""
        now = time.monotonic()
        born = self._born.get(id(smtp), now)
        cached = _Cached(smtp, born, now, asyncio.get_running_loop())
        if not smtp.is_connected or not self._fresh(cached, now):
            self._born.pop(id(smtp), None)
            return False
        self._idle.setdefault((host, port), []).append(cached)
        return True

    def forget(self, smtp: aiosmtplib.SMTP) -> None:
        self._born.pop(id(smtp), None)

    def _fresh(self, cached: _Cached, now: float) -> bool:
        return (
            cached.loop is asyncio.get_running_loop()  # a session lives in one loop
            and cached.smtp.is_connected
            and now - cached.idle_since < self.idle_time
            and now - cached.connected_at < self.reuse_time
        )

    def _drop(self, smtp: aiosmtplib.SMTP) -> None:
        self._born.pop(id(smtp), None)
        with contextlib.suppress(Exception):  # its loop may be gone
            smtp.close()

    async def expire(self) -> None:
        """QUIT the sessions that have idled too long (call now and then)."""
        now = time.monotonic()
        stale: list[_Cached] = []
        for key, sessions in list(self._idle.items()):
            keep = [c for c in sessions if self._fresh(c, now)]
            stale.extend(c for c in sessions if not self._fresh(c, now))
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        await self._close(stale)

    async def close(self) -> None:
        """QUIT every cached session (at shutdown)."""
        sessions = [c for cs in self._idle.values() for c in cs]
        self._idle.clear()
        await self._close(sessions)

    async def _close(self, sessions: list[_Cached]) -> None:
        loop = asyncio.get_running_loop()
        # QUIT them all at once, within one bound: a hung server must not hold up a stop
        ours = [c.smtp for c in sessions if c.loop is loop]
        if ours:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(_quit(smtp) for smtp in ours)), _QUIT_TIMEOUT)
        for cached in sessions:
            self._drop(cached.smtp)

    def __len__(self) -> int:
        return sum(len(cs) for cs in self._idle.values())


class _HostError(Exception):
    """This host did not take the transaction; try the next one."""

    def __init__(self, code: int, response: str, *, permanent: bool = False) -> None:
        super().__init__(response)
        self.code = code
        self.response = one_line(response)
        self.permanent = permanent


def _opportunistic_context() -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def deliver(
    hosts: list[tuple[str, int]],
    sender: str,
    recipients: list[str],
    data: bytes,
    *,
    helo: str,
    timeout: float,
    cache: SessionCache | None = None,
) -> list[RcptResult]:
    """Deliver `data` to `recipients` through the first host that takes the transaction.

    Returns one RcptResult per recipient, in the order given; never raises for
    a delivery problem (those are results).
    """
    if not recipients:
        return []
    message = normalize_crlf(data)
    last: tuple[str, _HostError] | None = None
    for host, port in hosts:
        try:
            return await _via_host(
                host, port, sender, recipients, message, helo=helo, timeout=timeout, cache=cache
            )
        except _HostError as err:
            last = (host, err)
        except Exception as exc:  # unknown: temporary, and another host may do better
            last = (
                host,
                _HostError(451, f"451 4.3.0 delivery to {host} failed: {type(exc).__name__}: {exc}"),
            )
    if last is None:
        last = ("", _HostError(451, "451 4.4.4 no host to deliver to"))
    host, error = last
    result: Result = "failed" if error.permanent else "deferred"
    return [RcptResult(r, result, error.code, error.response, host) for r in recipients]


async def _via_host(
    host: str,
    port: int,
    sender: str,
    recipients: list[str],
    message: bytes,
    *,
    helo: str,
    timeout: float,
    cache: SessionCache | None,
) -> list[RcptResult]:
    smtp = cache.take(host, port) if cache is not None else None
    if smtp is not None:
        # A cached session fails this way before anything of the message
        # was sent (errors during DATA are results), so a fresh one is safe.
        with contextlib.suppress(_HostError):
            return await _deliver_to(
                host, port, sender, recipients, message, helo=helo, timeout=timeout, cache=cache, smtp=smtp
            )
    return await _deliver_to(host, port, sender, recipients, message, helo=helo, timeout=timeout, cache=cache)


async def _deliver_to(
    host: str,
    port: int,
    sender: str,
    recipients: list[str],
    message: bytes,
    *,
    helo: str,
    timeout: float,
    cache: SessionCache | None = None,
    smtp: aiosmtplib.SMTP | None = None,
) -> list[RcptResult]:
    where = f"{host}:{port}"
    try:
        if smtp is None:
            smtp = await _open(host, port, helo=helo, timeout=timeout, tls=True)
            if cache is not None:
                cache.opened_now(smtp)
        results, clean = await _transaction(smtp, host, sender, recipients, message)
        if clean and cache is not None and cache.put(host, port, smtp):
            smtp = None  # kept for the next message
        else:
            await _quit(smtp)
        return results
    except SMTPConnectTimeoutError as exc:
        raise _HostError(451, f"451 4.4.1 connect to {where} timed out") from exc
    except SMTPConnectError as exc:
        cause = exc.__cause__
        why = os.strerror(cause.errno) if isinstance(cause, OSError) and cause.errno else str(exc)
        raise _HostError(451, f"451 4.4.1 connect to {where} failed: {why}") from exc
    except SMTPTimeoutError as exc:
        raise _HostError(451, f"451 4.4.2 timeout talking to {where}") from exc
    except (SMTPServerDisconnected, ConnectionError) as exc:
        raise _HostError(451, f"451 4.4.2 lost connection with {where}") from exc
    except SMTPResponseException as exc:  # greeting, EHLO/HELO, STARTTLS 421
        raise _HostError(exc.code, reply(exc.code, exc.message)) from exc
    finally:
        if smtp is not None:
            if cache is not None:
                cache.forget(smtp)
            smtp.close()


async def _open(host: str, port: int, *, helo: str, timeout: float, tls: bool) -> aiosmtplib.SMTP:
    """Connected, greeted, EHLO done; STARTTLS when offered (and `tls`), else plain text."""
    smtp = aiosmtplib.SMTP(hostname=host, port=port, local_hostname=helo, timeout=timeout, start_tls=False)
    try:
        await smtp.connect()
        await _hello(smtp, helo)
    except BaseException:
        smtp.close()
        raise
    if not (tls and smtp.supports_extension("starttls")):
        return smtp
    try:
        await smtp.starttls(tls_context=_opportunistic_context())
    except SMTPResponseException as exc:
        if exc.code != _SERVICE_CLOSING and smtp.is_connected:
            return smtp  # refused (454 ...): the plain-text session goes on
        smtp.close()
        raise
    except Exception:  # the handshake failed: same host again, without TLS
        smtp.close()
        return await _open(host, port, helo=helo, timeout=timeout, tls=False)
    try:
        await _hello(smtp, helo)
    except Exception:  # TLS up but unusable: same host again, without TLS
        smtp.close()
        return await _open(host, port, helo=helo, timeout=timeout, tls=False)
    return smtp


async def _hello(smtp: aiosmtplib.SMTP, helo: str) -> None:
    try:
        await smtp.ehlo(hostname=helo)
    except SMTPHeloError as exc:
        # 500/502/504: a server that does not know EHLO; RFC 5321 says fall back to HELO.
        if exc.code not in (500, 502, 504) or not smtp.is_connected:
            raise
        await smtp.helo(hostname=helo)


def _envelope(address: str, utf8: bool) -> bytes | None:
    try:
        return b"<" + address.encode("utf-8" if utf8 else "ascii") + b">"
    except UnicodeEncodeError:
        return None


async def _transaction(
    smtp: aiosmtplib.SMTP, host: str, sender: str, recipients: list[str], message: bytes
) -> tuple[list[RcptResult], bool]:
    """The results, and whether the session ended the transaction cleanly (reusable)."""
    header_ascii = message[: _header_length(message)].isascii()
    offered_utf8 = smtp.supports_extension("smtputf8")
    envelope_ascii = sender.isascii() and all(r.isascii() for r in recipients)
    utf8 = offered_utf8 and not (envelope_ascii and header_ascii)
    no_utf8 = f"553 5.6.7 SMTPUTF8 is required, but was not offered by host {host}"

    mail_from = _envelope(sender, utf8)
    if mail_from is None:
        return [RcptResult(r, "failed", 553, no_utf8, host) for r in recipients], False
    options: list[bytes] = []
    if utf8:
        options.append(b"SMTPUTF8")
    if not message.isascii() and smtp.supports_extension("8bitmime"):
        options.append(b"BODY=8BITMIME")
    if smtp.supports_extension("size"):
        options.append(b"SIZE=%d" % len(message))
    try:
        response = await smtp.execute_command(b"MAIL", b"FROM:" + mail_from, *options)
    except ValueError as exc:  # a control character in the sender: can never be sent
        text = f"553 5.1.7 bad sender address syntax: {exc}"
        return [RcptResult(r, "failed", 553, text, host) for r in recipients], False
    if not 200 <= response.code < 300:
        permanent = 500 <= response.code < 600
        raise _HostError(response.code, reply(response.code, response.message), permanent=permanent)

    results: dict[str, RcptResult] = {}
    accepted: list[str] = []
    for rcpt in recipients:
        if rcpt in results or rcpt in accepted:
            continue
        rcpt_to = _envelope(rcpt, utf8)
        if rcpt_to is None:
            results[rcpt] = RcptResult(rcpt, "failed", 553, no_utf8, host)
            continue
        try:
            response = await smtp.execute_command(b"RCPT", b"TO:" + rcpt_to)
        except ValueError as exc:
            text = f"553 5.1.3 bad recipient address syntax: {exc}"
            results[rcpt] = RcptResult(rcpt, "failed", 553, text, host)
            continue
        if response.code == _SERVICE_CLOSING:
            raise _HostError(response.code, reply(response.code, response.message))
        outcome = result_for_code(response.code)
        if outcome == "delivered":
            accepted.append(rcpt)
        else:
            results[rcpt] = RcptResult(
                rcpt, outcome, response.code, reply(response.code, response.message), host
            )

    if not accepted:
        clean = False
        with contextlib.suppress(Exception):
            clean = (await smtp.execute_command(b"RSET", timeout=_QUIT_TIMEOUT)).code == 250
        return [results[r] for r in recipients], clean

    clean = False
    try:
        response = await smtp.data(message)
        code, text = response.code, reply(response.code, response.message)
        clean = True
    except SMTPDataError as exc:
        # Refused at DATA or at the final dot: aiosmtplib does not say which,
        # so whether the transaction is still open is unknown; not reused.
        code, text = exc.code, reply(exc.code, exc.message)
    except (SMTPServerDisconnected, SMTPTimeoutError, ConnectionError) as exc:
        what = "timeout" if isinstance(exc, TimeoutError) else "lost connection"
        code, text = 451, f"451 4.4.2 {what} with {host} during DATA (the message may arrive twice)"
    outcome = result_for_code(code)
    for rcpt in accepted:
        results[rcpt] = RcptResult(rcpt, outcome, code, text, host)
    return [results[r] for r in recipients], clean


def _header_length(message: bytes) -> int:
    match = _HEADER_END.search(message)
    return match.end() if match else len(message)


async def _quit(smtp: aiosmtplib.SMTP) -> None:
    if smtp.is_connected:
        with contextlib.suppress(Exception):
            await smtp.quit(timeout=_QUIT_TIMEOUT)
