"""Which services should run: the control side of the event log.

`spool services stop NAME` appends `service_stopped` (actor cli:USER) and
records the wish in `DATA/services.json`; a running supervisor follows the
log and stops the service within a second; a supervisor starting later
reads services.json and leaves it stopped. `start` is the mirror image.

Failure rules: an unknown service name is a SpoolError listing the known
ones; nothing is appended or written for it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import msgspec

from events import EventLog
from events import schema as ev
from events.errors import SpoolError
from spoolfs import durable

DESCRIPTIONS = {
    "smtp": "SMTP listener: accepts mail and puts it in the spool",
    "delivery": "Scheduler and delivery workers: MX lookup, SMTP out, local Maildir, retries, bounces",
    "pickup": "Watches DATA/pickup/ and enqueues the .eml files dropped there",
    "purge": "Removes what has expired (old tmp/ debris)",
}


class ServiceState(msgspec.Struct):
    stopped: list[str] = []


def _state_path(data: Path) -> Path:
    return Path(data) / "services.json"


def read_state(data: Path) -> ServiceState:
    try:
        return msgspec.json.decode(_state_path(data).read_bytes(), type=ServiceState)
    except (FileNotFoundError, msgspec.DecodeError, msgspec.ValidationError):
        return ServiceState()


def set_service(data: Path, log: EventLog, name: str, *, active: bool, actor: str) -> None:
    if name not in DESCRIPTIONS:
        raise SpoolError(f"no service {name!r}; services: {', '.join(DESCRIPTIONS)}")
    lock = os.open(Path(data) / "services.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = read_state(data)
        stopped = set(state.stopped)
        event: ev.Event = ev.ServiceStarted(name=name) if active else ev.ServiceStopped(name=name)
        log.append(event, actor)
        stopped.discard(name) if active else stopped.add(name)
        tmp = _state_path(data).with_name("services.json.tmp")
        durable.unlink_quietly(tmp)
        durable.write_durably(
            tmp, _state_path(data), msgspec.json.encode(ServiceState(sorted(stopped))) + b"\n"
        )
    finally:
        os.close(lock)


def pid_path(data: Path) -> Path:
    return Path(data) / "serve.pid"


def running_pid(data: Path) -> int | None:
    """The supervisor's pid if one runs on this data directory (it holds a lock on serve.pid)."""
    try:
        fd = os.open(pid_path(data), os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 32).decode().strip()
            return int(text) if text.isdigit() else -1
        return None
    finally:
        os.close(fd)


class ServiceRow(msgspec.Struct):
    name: str
    active: bool
    description: str


def list_services(data: Path) -> list[ServiceRow]:
    running = running_pid(data) is not None
    stopped = set(read_state(data).stopped)
    return [ServiceRow(name, running and name not in stopped, desc) for name, desc in DESCRIPTIONS.items()]
