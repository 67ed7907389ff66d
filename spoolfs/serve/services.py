"""The services a worker process can run. Each fills in `run` (like
Mailman's runners): run until `stop` is set, then finish what is in flight
within a bound.

Failure rules: an exception escaping `run` ends the worker process with
status 1; the supervisor restarts it. Work in flight is protected by the
spool's own rules (a claimed message is released when the process dies).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import Protocol

from spoolfs.config import Config
from spoolfs.quarantine import Quarantine
from spoolfs.smtp.server import SmtpServer
from spoolfs.spool import Spool


class Service(Protocol):
    async def run(self, stop: asyncio.Event) -> None: ...

    def reload(self, config: Config) -> None: ...


class SmtpService:
    def __init__(self, config: Config, spool: Spool) -> None:
        self.server = SmtpServer(config, spool)

    async def run(self, stop: asyncio.Event) -> None:
        await self.server.start()
        await stop.wait()
        await self.server.stop(grace=10.0)

    def reload(self, config: Config) -> None:
        self.server.reload(config)


class PurgeService:
    """Removes tmp/ debris older than a day (an enqueue never takes that long),
    and quarantined messages whose time is up (a `quarantine_purged` event
    each), after finishing what a crash left half-done in the quarantine."""

    MAX_AGE = 86400.0
    INTERVAL = 600.0

    def __init__(self, config: Config, spool: Spool) -> None:
        self.spool = spool
        self.reload(config)

    def purge_once(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        removed = 0
        tmp = self.spool.layout.tmp
        for name in os.listdir(tmp):
            path = tmp / name
            with contextlib.suppress(FileNotFoundError):
                if now - path.stat().st_mtime > self.MAX_AGE:
                    path.unlink()
                    removed += 1
        return removed

    def purge_quarantine(self) -> int:
        """Expired quarantine entries removed (the clock is events.clock)."""
        self.quarantine.recover()
        return len(self.quarantine.purge())

    def _round(self) -> None:
        self.purge_once()
        self.purge_quarantine()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.to_thread(self._round)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.INTERVAL)

    def reload(self, config: Config) -> None:
        self.quarantine = Quarantine.for_spool(self.spool, config)


def make_service(name: str, config: Config, spool: Spool, *, shard: tuple[int, int] = (0, 1)) -> Service:
    if name == "smtp":
        return SmtpService(config, spool)
    if name == "purge":
        return PurgeService(config, spool)
    if name == "pickup":
        from spoolfs.serve.pickup import PickupService

        return PickupService(config, spool)
    if name == "delivery":
        from spoolfs.delivery.service import DeliveryService

        return DeliveryService(config, spool, shard=shard)
    raise ValueError(f"unknown service {name}")
