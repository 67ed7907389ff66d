"""Which message to try next.

Due messages go in order: forced first, then priority (high, normal, low),
then the earliest next attempt. Messages not yet due wait in a second heap
ordered by time. Held messages are not in the schedule at all.

The schedule is kept from the event log (the delivery service follows it),
so it never needs the sidecars after start-up: an enqueue, force, hold,
release, priority change, retry reset, deferral or finish each move one
entry. Heaps use lazy deletion: each entry has a version, stale heap items
are skipped.

Failure rules: pure in-memory bookkeeping, nothing here fails.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from events import schema as ev
from events.schema import Record

RANK = {"high": 0, "normal": 1, "low": 2}


@dataclass
class Entry:
    priority: int
    next_at: float
    forced: bool
    version: int = 0


class Schedule:
    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self._waiting: list[tuple[float, int, str]] = []  # (next_at, version, id)
        self._ready: list[tuple[int, int, float, int, str]] = []  # (forced?0:1, prio, next_at, version, id)
        self._version = 0

    def __len__(self) -> int:
        return len(self.entries)

    def upsert(
        self,
        mid: str,
        *,
        priority: int | None = None,
        next_at: float | None = None,
        forced: bool | None = None,
    ) -> None:
        old = self.entries.get(mid)
        if old is None:
            if next_at is None:
                return  # a change to a message we do not schedule (held, unknown)
            old = Entry(RANK["normal"], next_at, False)
        self._version += 1
        entry = Entry(
            priority if priority is not None else old.priority,
            next_at if next_at is not None else old.next_at,
            forced if forced is not None else old.forced,
            self._version,
        )
        self.entries[mid] = entry
        heapq.heappush(self._waiting, (entry.next_at, entry.version, mid))

    def remove(self, mid: str) -> None:
        self.entries.pop(mid, None)

    def _current(self, mid: str, version: int) -> Entry | None:
        entry = self.entries.get(mid)
        return entry if entry is not None and entry.version == version else None

    def _promote(self, now: float) -> None:
        while self._waiting and (self._waiting[0][0] <= now or self._forced(self._waiting[0])):
            next_at, version, mid = heapq.heappop(self._waiting)
            entry = self._current(mid, version)
            if entry is not None:
                heapq.heappush(self._ready, (0 if entry.forced else 1, entry.priority, next_at, version, mid))

    def _forced(self, item: tuple[float, int, str]) -> bool:
        entry = self._current(item[2], item[1])
        return entry is not None and entry.forced

    def pop_due(self, now: float) -> str | None:
        """The next message to deliver now, taken out of the schedule."""
        self._promote(now)
        while self._ready:
            _, _, _, version, mid = heapq.heappop(self._ready)
            if self._current(mid, version) is not None:
                del self.entries[mid]
                return mid
        return None

    def next_due(self) -> float | None:
        while self._waiting and self._current(self._waiting[0][2], self._waiting[0][1]) is None:
            heapq.heappop(self._waiting)
        return self._waiting[0][0] if self._waiting else None

    def apply(self, record: Record) -> None:
        """Keep the schedule in step with one event of the log."""
        e = record.payload
        at = record.at.timestamp()
        match e:
            case ev.MessageEnqueued():
                self.upsert(e.id, priority=RANK[e.priority], next_at=at, forced=False)
            case ev.PrioritySet():
                if e.id in self.entries:
                    self.upsert(e.id, priority=RANK[e.priority])
            case ev.MessageHeld():
                self.remove(e.id)
            case ev.MessageReleased() | ev.RetriesReset():
                self.upsert(e.id, next_at=at)
            case ev.MessageForced():
                self.upsert(e.id, next_at=at, forced=True)
            case ev.MessageDeferred():
                self.upsert(e.id, next_at=e.next_attempt_at.timestamp(), forced=False)
            case ev.MessageDeleted() | ev.MessageFinished() | ev.MovedToCorrupt():
                self.remove(e.id)
            case ev.SpoolRepaired(action="forgotten"):
                self.remove(e.id)
            case _:
                pass
