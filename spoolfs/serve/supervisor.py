"""The supervisor: starts the worker processes, restarts the ones that die,
and acts on service control events from the log.

- smtp: `smtp.workers` processes (0: one per core) sharing the port with
  SO_REUSEPORT; delivery: `delivery.workers` processes (0: one per core),
  each given its share of the subspools (SPOOL_SHARD=k/n); pickup, purge:
  one process each.
- A worker that dies is restarted (at most once a second per slot); the
  others go on. Each start and stop is a `service_started` /
  `service_stopped` event (actor `system`, with the pid).
- `spool services stop NAME` (an event by actor cli:USER) stops that
  service's processes within a second; `start` starts them again.
- Before anything starts, a child process runs the recovery fsck; while
  the server runs, every `events.checkpoint_every` events a child moves the
  replay checkpoint up, so that the next start replays little of the log.
- SIGTERM/SIGINT: SIGTERM to every worker (they stop accepting and finish
  what is in flight), SIGKILL whatever is left after `grace` seconds.
  SIGHUP: the config is re-read; if it is valid, workers get SIGHUP.

Failure rules: another supervisor on the same data directory, or a listen
address that cannot be bound, is a SpoolError before anything starts.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from events import EventLog, head_seq
from events import schema as ev
from events.errors import SpoolError
from events.reader import Cursor, poll
from spoolfs.config import Config, Overrides, apply_overrides, load_config
from spoolfs.serve.control import DESCRIPTIONS, pid_path, read_state
from spoolfs.smtp.server import listen_socket


@dataclass
class Slot:
    service: str
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restarts: int = 0


@dataclass
class Supervisor:
    config_path: str | None
    data_dir: str | None
    overrides: Overrides
    grace: float = 15.0
    say: Callable[[str], None] = field(default=lambda text: print(text, flush=True))

    def __post_init__(self) -> None:
        self.config = self._load()
        self.data = Path(self.config.data_dir)
        self.slots: list[Slot] = []
        self.stopping = False
        self.reload_wanted = False
        self.log: EventLog | None = None
        self.checkpointer: subprocess.Popen[bytes] | None = None
        self.checkpointed = 0  # the log's head when the last checkpoint was begun

    def _load(self) -> Config:
        return apply_overrides(load_config(self.config_path, data_dir=self.data_dir), self.overrides)

    def _env(self, slot: Slot | None = None) -> dict[str, str]:
        env = dict(os.environ)
        if slot is not None:
            env["SPOOL_SHARD"] = f"{slot.index}/{self._counts()[slot.service]}"
        # glibc's per-thread arenas make the thread-pool workers hold on to
        # memory they no longer use; one arena keeps RSS down (the GIL serialises
        # most allocations anyway).
        env.setdefault("MALLOC_ARENA_MAX", "1")
        if self.config_path:
            env["SPOOL_CONFIG"] = str(self.config_path)
        env["SPOOL_DATA_DIR"] = self.config.data_dir
        env["SPOOL_OVERRIDES"] = msgspec.json.encode(self.overrides).decode()
        return env

    def _counts(self) -> dict[str, int]:
        cores = os.cpu_count() or 1
        return {
            "smtp": self.config.smtp.workers or cores,
            "delivery": self.config.delivery.workers or cores,
            "pickup": 1,
            "purge": 1,
        }

    # --- processes ------------------------------------------------------------

    def _spawn(self, slot: Slot) -> None:
        slot.proc = subprocess.Popen(
            [sys.executable, "-m", "spoolfs.serve.worker", slot.service], env=self._env(slot)
        )
        slot.started = time.monotonic()

    def start_service(self, name: str, actor: str = "system") -> None:
        if any(s.service == name for s in self.slots):
            return
        for i in range(self._counts()[name]):
            slot = Slot(name, i)
            self._spawn(slot)
            self.slots.append(slot)
        pids = [s.proc.pid for s in self.slots if s.service == name and s.proc]
        assert self.log is not None
        self.log.append(ev.ServiceStarted(name=name, pid=pids[0] if pids else 0), actor)
        self.say(f"started {name} (pid {', '.join(map(str, pids))})")

    def stop_service(self, name: str, reason: str) -> None:
        mine = [s for s in self.slots if s.service == name]
        self._terminate(mine)
        self.slots = [s for s in self.slots if s.service != name]
        if mine:
            assert self.log is not None
            self.log.append(ev.ServiceStopped(name=name, reason=reason), "system")
            self.say(f"stopped {name} ({reason})")

    def _terminate(self, slots: list[Slot]) -> None:
        for s in slots:
            if s.proc and s.proc.poll() is None:
                s.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for s in slots:
            if s.proc is None:
                continue
            try:
                s.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                s.proc.kill()
                s.proc.wait()

    def _reap(self) -> None:
        if self.stopping:
            # a SIGTERM or Ctrl-C to the whole process group stops the workers
            # too: what exits now is leaving, not crashing
            return
        for s in self.slots:
            if s.proc is None or s.proc.poll() is None:
                continue
            code = s.proc.returncode
            if time.monotonic() - s.started < 1.0:
                continue  # crash loop: wait a second between restarts
            s.restarts += 1
            self.say(f"{s.service}[{s.index}] exited with {code}; restarting")
            self._spawn(s)

    # --- the control bus ------------------------------------------------------

    CONTROL = ("service_started", "service_stopped")

    def _follow(self, cursor: Cursor) -> Cursor:
        records, cursor = poll(self.data / "events", cursor, self.CONTROL)
        for record in records:
            if not record.actor.startswith("cli:"):
                continue
            p = record.payload
            if isinstance(p, ev.ServiceStopped):
                self.stop_service(p.name, f"by {record.actor}")
            elif isinstance(p, ev.ServiceStarted) and p.name in DESCRIPTIONS:
                self.start_service(p.name)
        return cursor

    # --- main loop ------------------------------------------------------------

    def run(self) -> int:
        self.data.mkdir(parents=True, exist_ok=True)
        lock = os.open(pid_path(self.data), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            pid = Path(pid_path(self.data)).read_text().strip()
            raise SpoolError(f"spool serve is already running on {self.data} (pid {pid})") from None
        os.ftruncate(lock, 0)
        os.write(lock, f"{os.getpid()}\n".encode())
        try:
            return self._run()
        finally:
            os.ftruncate(lock, 0)
            os.close(lock)

    def _run(self) -> int:
        listen_socket(self.config.smtp.listen).close()  # fail now, not in a restart loop
        from spoolfs.layout import Layout

        Layout(self.data, self.config.subspools).create()
        self._recover()
        self.log = EventLog(self.data / "events", node=self.config.node)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        try:
            cursor = Cursor(head_seq(self.data / "events") + 1)
            self.checkpointed = cursor.next_seq - 1
            stopped = set(read_state(self.data).stopped)
            self.say(
                f"spool serve: data in {self.data}, SMTP on {self.config.smtp.listen}, "
                f"local domains {', '.join(self.config.smtp.local_domains) or '(none)'}"
            )
            for name in DESCRIPTIONS:
                if name in stopped:
                    self.say(f"{name} is stopped (spool services start {name})")
                else:
                    self.start_service(name)
            while not self.stopping:
                time.sleep(0.2)
                if self.reload_wanted:
                    self._reload()
                self._reap()
                cursor = self._follow(cursor)
                self._checkpoint(cursor.next_seq - 1)
            for name in list(dict.fromkeys(s.service for s in self.slots)):
                self.stop_service(name, "spool serve stopping")
            return 0
        finally:
            self._terminate(self.slots)
            if self.checkpointer is not None and self.checkpointer.poll() is None:
                self.checkpointer.terminate()  # a checkpoint cut short leaves the old one
                self.checkpointer.wait()
            self.log.close()

    def _checkpoint(self, head: int) -> None:
        """Every `events.checkpoint_every` events, a child moves the replay checkpoint up."""
        if self.checkpointer is not None:
            if self.checkpointer.poll() is None:
                return
            if self.checkpointer.returncode != 0:
                self.say(
                    f"checkpoint exited with {self.checkpointer.returncode}; the next start replays more"
                )
            self.checkpointer = None
        if head - self.checkpointed >= self.config.events.checkpoint_every:
            self.checkpointed = head
            self.checkpointer = subprocess.Popen(
                [sys.executable, "-m", "spoolfs.serve.worker", "checkpoint"], env=self._env()
            )

    def _recover(self) -> None:
        """Finish what a crash left half-done (like Postfix's queue check at start).

        In a child process: replaying the log takes memory that a long-lived
        supervisor would keep for good. Its lines go to our stdout."""
        done = subprocess.run(
            [sys.executable, "-m", "spoolfs.serve.worker", "recover"], env=self._env(), check=False
        )
        if done.returncode != 0:
            raise SpoolError(f"recovery at start failed (exit {done.returncode}); see above")

    def _on_stop(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _on_hup(self, signum: int, frame: object) -> None:
        self.reload_wanted = True

    def _reload(self) -> None:
        self.reload_wanted = False
        try:
            self.config = self._load()
        except SpoolError as exc:
            self.say(f"reload refused, keeping the running config: {exc}")
            return
        for s in self.slots:
            if s.proc and s.proc.poll() is None:
                s.proc.send_signal(signal.SIGHUP)
        self.say("configuration reloaded")
