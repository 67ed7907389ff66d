"""fsck: compare the files on disk with the spool the log describes.

The log is the truth; the sidecars are snapshots of it. A crash can leave
the two apart only in the ways listed in `Problem.kind`, and each has one
repair, itself recorded as an event:

  tmp-leftover      a file in spool/tmp/ no event speaks of: it was never
                    acknowledged; removed.
  body-in-tmp       the log has the message, its body is still in tmp/:
                    moved into its subspool, sidecar written from the log.
  missing-sidecar   the log has the message and its body: sidecar written.
  stale-sidecar     the sidecar is behind the log (or differs): rewritten.
  gone-but-present  the log says the message left the spool (deleted,
                    finished) but files remain: removed.
  no-enqueue-event  a sidecar or body the log never heard of: moved to
                    corrupt/ (we did not write it; we do not delete it).
  corrupt-sidecar   the sidecar does not parse: the pair moves to corrupt/.
  vanished          the log has the message but its body is gone: the
                    message is forgotten (`spool_repaired`, action
                    "forgotten"), and a sidecar without a body is removed.

Failure rules: fsck reads without changing anything unless `repair` is
true. It claims each message before repairing it, so a running daemon and
fsck never work on the same message at once; a busy message is reported,
not repaired. Events appended while fsck runs are caught up before a
difference is reported, so a concurrent change is not mistaken for damage.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Literal

import msgspec

from events import read_records
from events import schema as ev
from events.reader import Cursor, poll
from spoolfs import durable
from spoolfs.claim import claim
from spoolfs.errors import MessageBusy, MessageNotFound
from spoolfs.spool import Spool
from spoolfs.state import Replay, Sidecar, decode_sidecar, encode_sidecar, replay

Kind = Literal[
    "tmp-leftover",
    "body-in-tmp",
    "missing-sidecar",
    "stale-sidecar",
    "gone-but-present",
    "no-enqueue-event",
    "corrupt-sidecar",
    "vanished",
]


class Problem(msgspec.Struct, frozen=True):
    kind: Kind
    id: str
    detail: str
    repaired: bool = False


class FsckReport(msgspec.Struct):
    problems: list[Problem]
    messages: int
    last_seq: int


def replay_log(spool: Spool, into: Replay | None = None) -> Replay:
    start = (into.last_seq + 1) if into is not None else 1
    return replay(read_records(spool.layout.events, from_seq=start), into)


def fsck(
    spool: Spool,
    *,
    repair: bool = False,
    tmp_age: float = 60.0,
    progress: Callable[[int], None] | None = None,
) -> FsckReport:
    """Find (and with `repair`, mend) every difference between files and log.

    Files in tmp/ younger than `tmp_age` seconds are left alone: they may be
    an enqueue in progress.
    """
    return check(spool, replay_log(spool), repair=repair, tmp_age=tmp_age, progress=progress)[0]


def check(
    spool: Spool,
    state: Replay,
    *,
    repair: bool = False,
    tmp_age: float = 60.0,
    progress: Callable[[int], None] | None = None,
) -> tuple[FsckReport, Replay]:
    """fsck against `state`, the log replayed up to some seq (it is caught up as needed).

    Returns the report and the state as of the end, for a checkpoint.
    """
    lay = spool.layout
    candidates: set[str] = set(state.states)
    for nn in lay.subspool_names():
        try:
            names = os.listdir(lay.spool / nn)
        except FileNotFoundError:
            continue
        candidates.update(n.partition(".")[0] for n in names if n.endswith((".json", ".eml")))
    now = time.time()
    tmp_names: list[str] = []
    for name in sorted(os.listdir(lay.tmp)) if lay.tmp.exists() else []:
        try:
            if now - os.stat(lay.tmp / name).st_mtime >= tmp_age:
                tmp_names.append(name)
        except FileNotFoundError:
            continue
    candidates.update(n.partition(".")[0] for n in tmp_names)

    fixer = _Fixer(spool, state, repair, set(tmp_names))
    problems: list[Problem] = []
    for mid in sorted(candidates):
        problems.extend(fixer.examine(mid))
        if progress is not None:
            progress(1)
    report = FsckReport(problems=problems, messages=len(fixer.state.states), last_seq=fixer.state.last_seq)
    return report, fixer.state


class _Files(msgspec.Struct):
    """What is on disk for one message right now."""

    sidecar: bytes | None
    body: bool
    tmp_body: bool
    tmp_other: list[str]


class _Fixer:
    def __init__(self, spool: Spool, state: Replay, repair: bool, old_tmp: set[str]) -> None:
        self.spool = spool
        self.lay = spool.layout
        self.state = state
        self.repair = repair
        self.old_tmp = old_tmp
        self.cursor: Cursor | None = None

    def catch_up(self) -> None:
        """Apply what the log gained since; reads only the new bytes after the first call.

        (Re-reading the log's last segment from its start for every repair made
        a recovery with 13,000 problems take more than a quarter of an hour.)
        """
        if self.cursor is None:
            self.cursor = Cursor(self.state.last_seq + 1)
        records, self.cursor = poll(self.lay.events, self.cursor)
        self.state = replay(records, self.state)

    def files(self, mid: str) -> _Files:
        try:
            sidecar: bytes | None = self.lay.sidecar(mid).read_bytes()
        except FileNotFoundError:
            sidecar = None
        tmp_body = f"{mid}.eml" in self.old_tmp and self.lay.tmp_eml(mid).exists()
        tmp_other = [
            n
            for n in self.old_tmp
            if n.partition(".")[0] == mid and n != f"{mid}.eml" and (self.lay.tmp / n).exists()
        ]
        return _Files(
            sidecar=sidecar, body=self.lay.eml(mid).exists(), tmp_body=tmp_body, tmp_other=tmp_other
        )

    def diagnose(self, mid: str, f: _Files) -> list[tuple[Kind, str]]:
        expected = self.state.states.get(mid)
        found: list[tuple[Kind, str]] = [("tmp-leftover", f"spool/tmp/{n}") for n in sorted(f.tmp_other)]
        sidecar: Sidecar | None = None
        if f.sidecar is not None:
            try:
                sidecar = decode_sidecar(f.sidecar)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                return [*found, ("corrupt-sidecar", f"sidecar does not parse: {exc}")]
        if expected is None:
            if f.tmp_body:
                found.append(("tmp-leftover", f"spool/tmp/{mid}.eml"))
            if sidecar is not None or f.body:
                if mid in self.state.gone:
                    found.append(("gone-but-present", "the log says this message left the spool"))
                else:
                    found.append(("no-enqueue-event", "files the log never heard of"))
            return found
        if not f.body:
            if f.tmp_body:
                return [*found, ("body-in-tmp", "body still in spool/tmp/")]
            return [*found, ("vanished", "the log has this message but its body is gone")]
        if f.tmp_body:
            found.append(("tmp-leftover", f"spool/tmp/{mid}.eml"))
        if sidecar is None:
            found.append(("missing-sidecar", "body present, sidecar missing"))
        elif sidecar != expected:
            if sidecar.seq < expected.seq:
                found.append(("stale-sidecar", f"sidecar at seq {sidecar.seq}, log at seq {expected.seq}"))
            else:
                found.append(("stale-sidecar", f"sidecar differs from the log at seq {expected.seq}"))
        return found

    def examine(self, mid: str) -> list[Problem]:
        found = self.diagnose(mid, self.files(mid))
        if not found or not self.repair:
            return [Problem(kind=k, id=mid, detail=d) for k, d in found]
        body = self.lay.eml(mid) if self.lay.eml(mid).exists() else self.lay.tmp_eml(mid)
        with ExitStack() as stack:
            try:
                if body.exists():
                    stack.enter_context(claim(body, mid, wait=0.5))
            except (MessageBusy, MessageNotFound) as exc:
                return [Problem(kind=k, id=mid, detail=f"{d}; not repaired: {exc}") for k, d in found]
            # look again now that nobody else can touch it
            self.catch_up()
            found = self.diagnose(mid, self.files(mid))
            for kind, _ in found:
                self.spool.log.append(
                    ev.SpoolRepaired(id=mid, problem=kind, action=self.mend(mid, kind)), self.spool.actor
                )
            if any(k == "vanished" for k, _ in found):
                self.catch_up()
        return [Problem(kind=k, id=mid, detail=d, repaired=True) for k, d in found]

    def mend(self, mid: str, kind: Kind) -> str:
        """Repair one problem; return the action's name for the event."""
        lay = self.lay
        if kind == "tmp-leftover":
            for name in [n for n in self.old_tmp if n.partition(".")[0] == mid]:
                if name == f"{mid}.eml" and mid in self.state.states and not lay.eml(mid).exists():
                    continue
                _unlink(lay.tmp / name)
            return "removed"
        if kind == "body-in-tmp":
            durable.publish(lay.tmp_eml(mid), lay.eml(mid))
            self._write_sidecar(mid)
            return "published"
        if kind in ("missing-sidecar", "stale-sidecar"):
            self._write_sidecar(mid)
            return "sidecar-rewritten"
        if kind == "gone-but-present":
            self.spool._remove_files(mid)
            return "removed"
        if kind in ("no-enqueue-event", "corrupt-sidecar"):
            self.spool.move_to_corrupt(mid, f"fsck: {kind}", actor=self.spool.actor)
            return "moved-to-corrupt"
        # vanished: a sidecar without its body must go; the log forgets the message
        if lay.sidecar(mid).exists():
            _unlink(lay.sidecar(mid))
            durable.fsync_dir(lay.sidecar(mid).parent)
        return "forgotten"

    def _write_sidecar(self, mid: str) -> None:
        _unlink(self.lay.tmp_sidecar(mid))
        durable.write_durably(
            self.lay.tmp_sidecar(mid), self.lay.sidecar(mid), encode_sidecar(self.state.states[mid])
        )


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
