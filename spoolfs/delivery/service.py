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
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import Awaitable
from functools import partial

from events import clock, head_seq
from events import schema as ev
from events.errors import SpoolError
from events.reader import Cursor, poll
from spoolfs.claim import claim
from spoolfs.config import Config, parse_hostport
from spoolfs.delivery import backoff, dsn, maildir, mx, remote
from spoolfs.delivery.results import DeliveryFailure, RcptResult
from spoolfs.delivery.scheduler import RANK, Schedule
from spoolfs.errors import CorruptSidecar, MessageBusy, MessageNotFound
from spoolfs.protolog import ProtocolLog
from spoolfs.spool import Spool
from spoolfs.state import Sidecar
from spoolfs.users import Users

POLL = 0.2
BUSY_RETRY = 5.0
STORE_RETRY = 0.5


class DeliveryService:
    def __init__(self, config: Config, spool: Spool, *, grace: float = 30.0) -> None:
        self.spool = spool
        self.grace = grace
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

    def load(self) -> int:
        """Schedule every message in the spool; return the seq to follow from."""
        start = head_seq(self.spool.layout.events) + 1
        for s in self.spool.sidecars():
            if s.status != "held":
                self.schedule.upsert(
                    s.id, priority=RANK[s.priority], next_at=s.next_attempt_at.timestamp(), forced=s.forced
                )
        return start

    def follow(self, cursor: Cursor) -> Cursor:
        records, cursor = poll(self.spool.layout.events, cursor)
        for record in records:
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
        finally:
            follower.cancel()
            if self.in_flight:
                _, pending = await asyncio.wait(list(self.in_flight.values()), timeout=self.grace)
                for task in pending:
                    task.cancel()
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
            lay = self.spool.layout
            if lay.tmp_eml(mid).exists() or lay.eml(mid).exists():
                self.schedule.upsert(mid, next_at=clock.now().timestamp() + STORE_RETRY)
        except CorruptSidecar:
            return  # moved aside, with its own event
        except MessageBusy:
            self.schedule.upsert(mid, next_at=clock.now().timestamp() + BUSY_RETRY)
        except Exception as exc:  # never let one message stop the others
            self.protolog.write(mid, f"error: {type(exc).__name__}: {exc}")
            self.schedule.upsert(mid, next_at=clock.now().timestamp() + self.config.delivery.min_backoff)

    async def _attempt(self, mid: str) -> None:
        eml = self.spool.layout.eml(mid)
        with claim(eml, mid, wait=0.0):
            state = await asyncio.to_thread(self.spool.read_claimed, mid)
            if state.status == "held":
                return
            now = clock.now()
            if state.next_attempt_at > now and not state.forced:
                self.schedule.upsert(
                    mid, priority=RANK[state.priority], next_at=state.next_attempt_at.timestamp()
                )
                return
            body = await asyncio.to_thread(self.spool.message_bytes, mid)
            pending = [r.address for r in state.recipients if r.state in ("pending", "deferred")]
            try:
                results = await self._deliver_all(state, body, pending)
            except Exception as exc:  # an unexpected error defers, with the error recorded
                response = f"451 4.3.0 internal error: {type(exc).__name__}: {exc}"
                results = [RcptResult(r, "deferred", 451, response, "") for r in pending]
            done = await asyncio.to_thread(self._conclude, state, body, results)
            for r in results:
                self.protolog.write(
                    mid, f"to=<{r.recipient}> relay={r.host or 'none'} status={r.result} ({r.response})"
                )
            self.protolog.write(mid, done)

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
        sem = self.per_domain.setdefault(domain, asyncio.Semaphore(d.per_domain))
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
                hosts, state.sender, rcpts, body, helo=self.hostname, timeout=d.timeout
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
