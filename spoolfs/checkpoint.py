"""The replay checkpoint: the recovery at start reads only the log after it.

`spool serve` starts with a recovery fsck, and fsck needs the spool as the
log tells it. Replaying the whole log for that grows with the log for good
(6.8 s and 100 MB of memory for 1,000,000 events here); from a checkpoint,
the recovery replays only what was appended since (0.4 s). The recovery
leaves a checkpoint, and while the server runs, the supervisor has a child
process move it up every `events.checkpoint_every` events (`advance`), so a start
after a long run replays little too. A checkpoint holds the state of every
message in the spool: making one takes memory in proportion to the spool
(about 2.5 KB a queued message), in a short-lived process; while the server
runs, it is skipped during a large backlog (see serve/worker.py).

The checkpoint is `spool/replay-checkpoint.json` (msgspec JSON; `jq`
reads it): the seq it stands at, the SHA-256 of that record's line, the
state the log gives every message still in the spool (exactly the sidecars
as the log makes them), and in `gone` only those messages that had left the
log while files of theirs were still on disk. The ID of every message that
ever left is not kept: that list only grows.

Failure rules: a checkpoint is a shortcut, never the truth.
- One that does not decode is moved to spool/corrupt/ (never deleted) and
  one that does not match the log (its seq beyond the head, or another
  line at its seq, as after restoring the log from a backup) is left
  alone; either way the replay starts at seq 1 and `load` says why.
- It is written durably (temporary file beside it, fsync, rename,
  directory fsync), and only after every spool directory is fsynced: a
  finished message's files are unlinked without a directory fsync, and a
  power cut undoing such an unlink must not bring back files of a message
  the checkpoint no longer lists as gone. (Were it to happen anyway, fsck
  would move those files to corrupt/, not delete them.)
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import msgspec

from events import line_hash, read_records
from spoolfs import durable
from spoolfs.layout import Layout
from spoolfs.state import Replay, Sidecar, replay

NAME = "replay-checkpoint.json"


class Checkpoint(msgspec.Struct, frozen=True):
    seq: int
    hash: str
    states: dict[str, Sidecar]
    gone: list[str] = []


def path_of(layout: Layout) -> Path:
    return layout.spool / NAME


def load(layout: Layout) -> tuple[Replay | None, str]:
    """The replay as the checkpoint has it, or None; and a few words on which and why."""
    path = path_of(layout)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, "no checkpoint"
    except OSError as exc:
        return None, f"checkpoint unreadable ({exc.strerror}); replaying the whole log"
    try:
        cp = msgspec.json.decode(raw, type=Checkpoint)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        kept = _to_corrupt(layout, path)
        return None, f"checkpoint does not decode ({exc}); moved to {kept}; replaying the whole log"
    if line_hash(layout.events, cp.seq) != cp.hash:
        return None, f"checkpoint at seq {cp.seq} does not match the log; replaying the whole log"
    return Replay(states=dict(cp.states), gone=set(cp.gone), last_seq=cp.seq), f"checkpoint at seq {cp.seq}"


def save(layout: Layout, state: Replay) -> bool:
    """Write a checkpoint of `state`; False if the log has no line at its seq (nothing written)."""
    digest = line_hash(layout.events, state.last_seq)
    if digest is None:
        return False
    # Look first, sync after: an unlink between the two is then either seen
    # (kept in gone) or made durable by the sync; never neither.
    gone = sorted(mid for mid in state.gone if layout.eml(mid).exists() or layout.sidecar(mid).exists())
    for directory in (*(layout.spool / nn for nn in layout.subspool_names()), layout.tmp, layout.corrupt):
        durable.fsync_dir(directory)
    data = msgspec.json.encode(Checkpoint(seq=state.last_seq, hash=digest, states=state.states, gone=gone))
    final = path_of(layout)
    tmp = final.with_name(NAME + ".tmp")
    durable.unlink_quietly(tmp)  # a save killed half-way
    durable.write_durably(tmp, final, data)
    return True


def advance(layout: Layout) -> tuple[int, str]:
    """Move the checkpoint up to the log's head: (its new seq, what it started from).

    Changes nothing but the checkpoint; safe while the server runs.
    """
    start, why = load(layout)
    state = replay(read_records(layout.events, from_seq=start.last_seq + 1 if start else 1), start)
    save(layout, state)
    return state.last_seq, why


def _to_corrupt(layout: Layout, path: Path) -> Path:
    dest = layout.corrupt / f"{NAME}.{int(time.time())}"
    try:
        os.rename(path, dest)
    except OSError as exc:
        raise durable.translate(exc, f"cannot move {path} to {dest}") from exc
    durable.fsync_dir(layout.corrupt)
    return dest
