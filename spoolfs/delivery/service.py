"""The delivery service: schedule, claim, deliver, record, finish.

Failure rules (after maddy's queue):
- A message is delivered only while this process holds its claim; a claim
  held by someone else (a CLI command, another daemon) means "later".
- Per recipient: 2xx delivered, 4xx deferred, 5xx failed; anything
  unexpected while delivering is a deferral with the error recorded, and
  never stops the other messages.
- Every attempt is a `delivery_attempted` event and updates the sidecar;
  a recipient whose delivery event is durable is never delivered again.
- Failed recipients get a DSN to the sender (never to the null sender),
  enqueued as a message of its own. When every recipient is final, a
  `message_finished` event closes the story and the files go. Otherwise the
  message is deferred with doubling backoff, until its lifetime is over:
  then what is still pending bounces (`expired`).
- SIGTERM: no new deliveries; those in flight get `grace` seconds.

Several delivery processes share the work by subspool: with `shard=(k, n)`
this one schedules only the messages whose subspool index is k modulo n, so
two processes never contend for a message (a claim would stop them anyway).
SMTP sessions to a host are reused across messages (remote.SessionCache).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import time
from collections.abc import Awaitable
from functools import partial
from pathlib import Path

from events import clock, head_seq
from events import schema as ev
from events.errors import SpoolError
from events.reader import Cursor, poll
from spoolfs import claim
from spoolfs.config import Config, parse_hostport
from spoolfs.delivery import backoff, dsn, maildir, mx, remote
from spoolfs.delivery.results import DeliveryFailure, RcptResult
from spoolfs.delivery.scheduler import RANK, Schedule
from spoolfs.durable import translate
from spoolfs.errors import CorruptSidecar, MessageBusy, MessageNotFound
from spoolfs.protolog import ProtocolLog
from spoolfs.spool import Spool
from spoolfs.state import Sidecar
from spoolfs.users import Users

POLL = 0.2
BUSY_RETRY = 5.0
STORE_RETRY = 0.5
STORE_GIVE_UP = 60.0  # seconds a body may wait for its enqueue to finish


def _ids(names: list[str], suffix: str) -> set[str]:
    return {name[: -len(suffix)] for name in names if name.endswith(suffix)}


def _listing(directory: Path) -> list[str]:
    try:
        return os.listdir(directory)
    except FileNotFoundError:
        return []


def _read_all(fd: int, mid: str) -> bytes:
    """The body through the claim's own descriptor (the inode take() checked)."""
    chunks: list[bytes] = []
    offset = 0
    try:
        size = os.fstat(fd).st_size
        while chunk := os.pread(fd, max(size - offset, 65536), offset):
            chunks.append(chunk)
            offset += len(chunk)
    except OSError as exc:
        raise translate(exc, f"cannot read message {mid}") from exc
    return b"".join(chunks)


class DeliveryService:
    def __init__(
        self, config: Config, spool: Spool, *, grace: float = 30.0, shard: tuple[int, int] = (0, 1)
    ) -> None:
        self.spool = spool
        self.grace = grace
        self.shard = shard
        self.sessions = remote.SessionCache()
        self.schedule = Schedule()
        self.protolog = ProtocolLog(spool.layout.data / "log", "delivery")
        self.in_flight: dict[str, asyncio.Task[None]] = {}
        self.wake = asyncio.Event()
        self.reload(config)

    def reload(self, config: Config) -> None:
        self.config = config
        self.users = Users(self.spool.layout.data, config.smtp.local_domains)
        self.local_domains = {d.lower() for d in config.smtp.local_domains}
        self.limit = asyncio.Semaphore(config.delivery.concurrency)
        self.per_domain: dict[str, asyncio.Semaphore] = {}
        self.hostname = config.smtp.hostname or config.node

    # --- the loop -------------------------------------------------------------

    def mine(self, mid: str) -> bool:
        k, n = self.shard
        return n == 1 or self.spool.layout.subspool_index(mid) % n == k

    def load(self) -> int:
        """Schedule every message in the spool; return the seq to follow from."""
        lay = self.spool.layout
        start = head_seq(lay.events) + 1
        k, n = self.shard
        mine = [nn for i, nn in enumerate(lay.subspool_names()) if i % n == k]
        # An enqueue whose event is below `start` may still be moving its files
        # (body in tmp/, then body in its subspool, then the sidecar) while we
        # look. Looking at tmp/ first and then at each subspool finds it in one
        # place or the other; attempt() waits for it to finish.
        moving = {m for m in _ids(_listing(lay.tmp), ".eml") if self.mine(m)}
        for nn in mine:
            names = _listing(lay.spool / nn)  # one listing: both names at one moment
            moving |= _ids(names, ".eml") - _ids(names, ".json")
        for s in self.spool.sidecars(subspools=mine):
            if s.status != "held":
                self.schedule.upsert(
                    s.id, priority=RANK[s.priority], next_at=s.next_attempt_at.timestamp(), forced=s.forced
                )
        now = clock.now().timestamp()
        for mid in moving - set(self.schedule.entries):
            self.schedule.upsert(mid, next_at=now)
        return start

    def follow(self, cursor: Cursor) -> Cursor:
        records, cursor = poll(self.spool.layout.events, cursor)
        for record in records:
            mid = getattr(record.payload, "id", None)
            if isinstance(mid, str) and self.mine(mid):
                self.schedule.apply(record)
        if records:
            self.wake.set()
        return cursor

    async def run(self, stop: asyncio.Event) -> None:
        next_seq = await asyncio.to_thread(self.load)
        follower = asyncio.create_task(self._follow_loop(Cursor(next_seq), stop))
        try:
            while not stop.is_set():
                self.dispatch()
                await self._sleep(stop)
                await self.sessions.expire()
        finally:
            follower.cancel()
            if self.in_flight:
                _, pending = await asyncio.wait(list(self.in_flight.values()), timeout=self.grace)
                for task in pending:
                    task.cancel()
            await self.sessions.close()
            self.protolog.close()

    async def _follow_loop(self, cursor: Cursor, stop: asyncio.Event) -> None:
        while not stop.is_set():
            cursor = await asyncio.to_thread(self.follow, cursor)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), POLL)

    async def _sleep(self, stop: asyncio.Event) -> None:
        due = self.schedule.next_due()
        wait = 1.0 if due is None else min(1.0, max(0.0, due - clock.now().timestamp()))
        self.wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), max(wait, 0.01))

    def dispatch(self) -> None:
        now = clock.now().timestamp()
        while len(self.in_flight) < self.config.delivery.concurrency:
            mid = self.schedule.pop_due(now)
            if mid is None:
                return
            if mid in self.in_flight:
                continue
            task = asyncio.create_task(self.attempt(mid))
            self.in_flight[mid] = task
            task.add_done_callback(partial(self._done, mid))

    def _done(self, mid: str, _task: object = None) -> None:
        self.in_flight.pop(mid, None)
        self.wake.set()

    # --- one message ----------------------------------------------------------

    async def attempt(self, mid: str) -> None:
        """Deliver what is pending of one message, if nobody else holds it."""
        try:
            await self._attempt(mid)
        except MessageNotFound:
            # The enqueue event is followed before the body reaches its
            # subspool: an enqueue still in progress is tried again shortly.
            # A body that has waited a minute is the debris of a killed
            # enqueue, for the recovery fsck at the next start.
            if self._being_stored(mid):
                self.schedule.upsert(mid, next_at=clock.now().timestamp() + STORE_RETRY)
        except CorruptSidecar:
            return  # moved aside, with its own event
        except MessageBusy:
            self.schedule.upsert(mid, next_at=clock.now().timestamp() + BUSY_RETRY)
        except Exception as exc:  # never let one message stop the others
            self.protolog.write(mid, f"error: {type(exc).__name__}: {exc}")
            self.schedule.upsert(mid, next_at=clock.now().timestamp() + self.config.delivery.min_backoff)

    async def _attempt(self, mid: str) -> None:
        fd, state, body = await asyncio.to_thread(self._take, mid)
        held = True
        try:
            if state.status == "held":
                return
            if body is None:  # not due (yet): a change we followed late
                self.schedule.upsert(
                    mid, priority=RANK[state.priority], next_at=state.next_attempt_at.timestamp()
                )
                return
            pending = [r.address for r in state.recipients if r.state in ("pending", "deferred")]
            try:
                results = await self._deliver_all(state, body, pending)
            except Exception as exc:  # an unexpected error defers, with the error recorded
                response = f"451 4.3.0 internal error: {type(exc).__name__}: {exc}"
                results = [RcptResult(r, "deferred", 451, response, "") for r in pending]
            held = False  # the thread below lets go of the claim, whatever happens there
            done = await asyncio.to_thread(self._conclude_and_release, fd, state, body, results)
            for r in results:
                self.protolog.write(
                    mid, f"to=<{r.recipient}> relay={r.host or 'none'} status={r.result} ({r.response})"
                )
            self.protolog.write(mid, done)
        finally:
            if held:
                claim.release(fd)

    def _being_stored(self, mid: str) -> bool:
        lay = self.spool.layout
        for body in (lay.tmp_eml(mid), lay.eml(mid)):
            try:
                return time.time() - body.stat().st_mtime < STORE_GIVE_UP
            except FileNotFoundError:
                continue
        return False

    def _take(self, mid: str) -> tuple[int, Sidecar, bytes | None]:
        """The claim, the sidecar and, if it is due, the body: one trip to a thread."""
        fd = claim.take(self.spool.layout.eml(mid), mid, wait=0.0)
        try:
            state = self.spool.read_claimed(mid)
            due = state.status != "held" and (state.forced or state.next_attempt_at <= clock.now())
            return fd, state, _read_all(fd, mid) if due else None
        except BaseException:
            claim.release(fd)
            raise

    def _conclude_and_release(self, fd: int, state: Sidecar, body: bytes, results: list[RcptResult]) -> str:
        # The close frees a finished message's inode and blocks: not on the loop.
        try:
            return self._conclude(state, body, results)
        finally:
            claim.release(fd)

    async def _deliver_all(self, state: Sidecar, body: bytes, pending: list[str]) -> list[RcptResult]:
        groups: dict[str, list[str]] = {}
        for rcpt in pending:
            domain = rcpt.rpartition("@")[2].lower()
            key = (
                domain
                if domain in self.local_domains or not self.config.delivery.relayhost
                else "[relayhost]"
            )
            groups.setdefault(key, []).append(rcpt)
        jobs: list[Awaitable[list[RcptResult]]] = []
        for key, rcpts in groups.items():
            if key in self.local_domains:
                jobs.append(asyncio.to_thread(self._deliver_local, state, body, rcpts))
            else:
                jobs.append(self._deliver_remote(key, state, body, rcpts))
        out: list[RcptResult] = []
        for part in await asyncio.gather(*jobs):
            out.extend(part)
        return out

    def _deliver_local(self, state: Sidecar, body: bytes, rcpts: list[str]) -> list[RcptResult]:
        results = []
        for rcpt in rcpts:
            if not self.users.exists(rcpt):
                results.append(
                    RcptResult(rcpt, "failed", 550, f"550 5.1.1 <{rcpt}>: user unknown", "maildir")
                )
                continue
            try:
                maildir.deliver_maildir(
                    self.users.maildir(self.spool.layout.data, rcpt),
                    body,
                    sender=state.sender,
                    recipient=rcpt,
                    hostname=self.hostname,
                )
            except DeliveryFailure as exc:
                results.append(RcptResult(rcpt, "deferred", exc.code, exc.response, "maildir"))
                continue
            except SpoolError as exc:
                results.append(RcptResult(rcpt, "deferred", 451, f"451 4.3.0 maildir: {exc}", "maildir"))
                continue
            results.append(RcptResult(rcpt, "delivered", 250, "250 2.0.0 delivered to maildir", "maildir"))
        return results

    async def _deliver_remote(
        self, domain: str, state: Sidecar, body: bytes, rcpts: list[str]
    ) -> list[RcptResult]:
        d = self.config.delivery
        nameserver = parse_hostport(d.dns) if d.dns else None
        limit = d.relayhost_concurrency if domain == "[relayhost]" else d.per_domain
        sem = self.per_domain.setdefault(domain, asyncio.Semaphore(limit))
        async with sem:
            try:
                if domain == "[relayhost]":
                    host, port = parse_hostport(d.relayhost)
                    hosts = [(host, port)]
                else:
                    hosts = []
                    for name in await mx.resolve(domain, nameserver=nameserver, timeout=d.timeout):
                        with contextlib.suppress(DeliveryFailure):
                            for ip in await mx.resolve_host(name, nameserver=nameserver, timeout=d.timeout):
                                hosts.append((ip, d.smtp_port))
                    if not hosts:
                        return [
                            RcptResult(
                                r, "deferred", 451, f"451 4.4.3 no address for any MX host of {domain}", ""
                            )
                            for r in rcpts
                        ]
            except DeliveryFailure as exc:
                result = "deferred" if exc.temporary else "failed"
                return [RcptResult(r, result, exc.code, exc.response, "") for r in rcpts]  # type: ignore[arg-type]
            return await remote.deliver(
                hosts, state.sender, rcpts, body, helo=self.hostname, timeout=d.timeout, cache=self.sessions
            )

    def _conclude(self, state: Sidecar, body: bytes, results: list[RcptResult]) -> str:
        """Record the round (one group commit), bounce, finish or defer. Returns a log line."""
        d = self.config.delivery
        now = clock.now()
        events: list[ev.Event] = [
            ev.DeliveryAttempted(
                id=state.id,
                recipient=r.recipient,
                result=r.result,
                code=r.code,
                response=r.response,
                host=r.host,
            )
            for r in results
        ]
        outcome = {r.address: r.state for r in state.recipients}
        outcome.update({r.recipient: r.result for r in results})
        failed_now = [r for r in results if r.result == "failed"]
        still = [r for r in results if r.result == "deferred"]
        expired = bool(still) and backoff.expired(state.received_at, now, d.lifetime)
        bounce = failed_now + ([self._expired(r) for r in still] if expired else [])
        dsn_id = self._bounce(state, body, bounce, "failed") if bounce else ""
        if expired or all(v in ("delivered", "failed") for v in outcome.values()):
            kind = "expired" if expired else ("bounced" if "failed" in outcome.values() else "delivered")
            events.append(ev.MessageFinished(id=state.id, outcome=kind, dsn_id=dsn_id))  # type: ignore[arg-type]
            self.spool.record(state, events, "delivery")
            return f"finished: {kind}" + (f", dsn {dsn_id}" if dsn_id else "")
        delay = backoff.next_attempt_delay(state.attempts + 1, d.min_backoff, d.max_backoff)
        next_at = now + dt.timedelta(seconds=delay)
        events.append(
            ev.MessageDeferred(
                id=state.id, next_attempt_at=next_at, reason=still[0].response if still else ""
            )
        )
        if (
            d.delay_warning
            and not state.warned
            and (now - state.received_at).total_seconds() >= d.delay_warning
        ):
            warning = self._bounce(state, body, still, "delayed")
            if warning:
                events.append(ev.DelayWarned(id=state.id, dsn_id=warning))
        self.spool.record(state, events, "delivery")
        return f"deferred until {next_at:%Y-%m-%d %H:%M:%S}" + (f", dsn {dsn_id}" if dsn_id else "")

    @staticmethod
    def _expired(r: RcptResult) -> RcptResult:
        return RcptResult(r.recipient, "failed", r.code, f"{r.response} (delivery time expired)", r.host)

    def _bounce(self, state: Sidecar, body: bytes, rcpts: list[RcptResult], action: str) -> str:
        """Enqueue a DSN to the sender; '' when there must be none (null sender)."""
        if not state.sender or not rcpts:
            return ""
        report = dsn.build_dsn(
            body,
            original_sender=state.sender,
            recipients=rcpts,
            reporting_mta=self.hostname,
            arrival_date=state.received_at,
            action=action,  # type: ignore[arg-type]
            now=clock.now(),
        )
        bounce = self.spool.enqueue(
            report, "", [state.sender], source="bounce", actor="delivery", bounce_of=state.id
        )
        return bounce.id
