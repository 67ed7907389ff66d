"""The pickup service: files dropped into DATA/pickup/ become messages.

A dropper writes the message elsewhere and renames it into pickup/ (as
with Postfix's maildrop), as NAME.eml with the envelope either in
`X-Spool-From:` / `X-Spool-To:` headers at the top (removed before the
message is stored; several X-Spool-To lines or commas for several
recipients) or in NAME.json beside it: {"from": "...", "to": ["..."]}.
The envelope file must be in place before the .eml is.

Failure rules: a file is removed only after its message is durably in the
spool (a crash in between may enqueue it twice, never lose it). A file
whose envelope is missing or invalid moves to pickup/bad/ with a NAME.error
file saying why; nothing is deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from pathlib import Path

import msgspec
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from events.errors import SpoolError
from spoolfs.config import Config
from spoolfs.spool import Spool

RESCAN = 5.0


class Envelope(msgspec.Struct, forbid_unknown_fields=True):
    to: list[str]
    from_: str = msgspec.field(name="from", default="")


def split_envelope(raw: bytes) -> tuple[str | None, list[str], bytes]:
    """Take X-Spool-From/X-Spool-To header lines off the top of a message."""
    sender: str | None = None
    rcpts: list[str] = []
    rest = raw
    while True:
        end = rest.find(b"\n")
        line = rest[: end + 1] if end >= 0 else rest
        name, _, value = line.partition(b":")
        key = name.strip().lower()
        if key == b"x-spool-from":
            sender = value.strip().decode("utf-8", "replace")
        elif key == b"x-spool-to":
            rcpts += [r.strip() for r in value.decode("utf-8", "replace").split(",") if r.strip()]
        else:
            return sender, rcpts, rest
        rest = rest[end + 1 :] if end >= 0 else b""


class PickupService:
    def __init__(self, config: Config, spool: Spool) -> None:
        self.spool = spool
        self.dir = spool.layout.data / "pickup"
        self.bad = self.dir / "bad"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.bad.mkdir(exist_ok=True)
        self._lock = threading.Lock()
        self.enqueued = 0

    def process(self, path: Path) -> str | None:
        """Enqueue one dropped file; return the new ID (None if not ready or gone)."""
        if path.suffix != ".eml" or path.parent != self.dir:
            return None
        with self._lock:
            try:
                raw = path.read_bytes()
            except FileNotFoundError:
                return None
            envelope_file = path.with_suffix(".json")
            try:
                if envelope_file.exists():
                    env = msgspec.json.decode(envelope_file.read_bytes(), type=Envelope)
                    sender, rcpts, body = env.from_, env.to, raw
                else:
                    found, rcpts, body = split_envelope(raw)
                    if found is None or not rcpts:
                        raise SpoolError("no envelope: X-Spool-From and X-Spool-To headers, or NAME.json")
                    sender = found
                sidecar = self.spool.enqueue(body, sender, rcpts, source="pickup", actor="pickup")
            except (SpoolError, msgspec.DecodeError, msgspec.ValidationError) as exc:
                self._reject(path, envelope_file, str(exc))
                return None
            path.unlink()
            with contextlib.suppress(FileNotFoundError):
                envelope_file.unlink()
            self.enqueued += 1
            return sidecar.id

    def _reject(self, path: Path, envelope_file: Path, why: str) -> None:
        for p in (path, envelope_file):
            with contextlib.suppress(FileNotFoundError):
                os.rename(p, self.bad / p.name)
        (self.bad / f"{path.stem}.error").write_text(why + "\n")

    def scan(self) -> int:
        count = 0
        for name in sorted(os.listdir(self.dir)):
            if name.endswith(".eml") and self.process(self.dir / name):
                count += 1
        return count

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        service = self

        class Handler(FileSystemEventHandler):
            def on_moved(self, event: FileSystemEvent) -> None:
                loop.call_soon_threadsafe(_later, Path(str(event.dest_path)))

            def on_closed(self, event: FileSystemEvent) -> None:
                loop.call_soon_threadsafe(_later, Path(str(event.src_path)))

        def _later(path: Path) -> None:
            loop.run_in_executor(None, service.process, path)

        observer = Observer()
        observer.schedule(Handler(), str(self.dir), recursive=False)
        observer.start()
        try:
            while not stop.is_set():
                await asyncio.to_thread(self.scan)  # anything the watcher missed
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), RESCAN)
        finally:
            observer.stop()
            observer.join(timeout=5)

    def reload(self, config: Config) -> None:
        pass
