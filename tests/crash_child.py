"""Child process for the crash tests: works on a spool until it is killed.

Usage: python crash_child.py DATA_DIR SEED

After each operation has returned (so it is acknowledged), prints one line:
    enq ID SEQ SHA256      a message was enqueued (its enqueue event's seq)
    op TYPE ID SEQ         a change was made (the event's type and seq)
    del ID SEQ             a message was deleted
Lines are flushed at once, so the parent knows exactly what was acknowledged
before the SIGKILL.
"""

from __future__ import annotations

import hashlib
import random
import sys
import threading

from events import schema as ev
from spoolfs.config import load_config
from spoolfs.errors import MessageBusy, MessageNotFound
from spoolfs.spool import Spool

_out = threading.Lock()


def say(line: str) -> None:
    with _out:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def worker(spool: Spool, rng: random.Random, ids: list[str], ids_lock: threading.Lock) -> None:
    while True:
        choice = rng.random()
        with ids_lock:
            target = rng.choice(ids) if ids else None
        if choice < 0.45 or target is None:
            body = f"Subject: crash {rng.random()}\r\n\r\n".encode() + rng.randbytes(rng.randint(10, 6000))
            s = spool.enqueue(body, "sender@example.org", [f"r{rng.randint(1, 3)}@example.net"])
            say(f"enq {s.id} {s.seq} {hashlib.sha256(body).hexdigest()}")
            with ids_lock:
                ids.append(s.id)
            continue
        try:
            if choice < 0.55:
                (done,) = spool.delete([target]) or [None]
                if done is not None:
                    say(f"del {target} {done.seq}")
                with ids_lock:
                    if target in ids:
                        ids.remove(target)
                continue
            op = rng.choice(["hold", "release", "force", "reset", "prio", "attempt"])
            if op == "hold":
                changed = spool.hold([target])
            elif op == "release":
                changed = spool.release([target])
            elif op == "force":
                changed = spool.force([target])
            elif op == "reset":
                changed = spool.reset_retries([target])
            elif op == "prio":
                changed = spool.set_priority([target], rng.choice(["high", "normal", "low"]))
            else:
                changed = spool.change(
                    [target],
                    lambda s: ev.DeliveryAttempted(
                        id=s.id,
                        recipient=s.recipients[0].address,
                        result="deferred",
                        code=451,
                        response="451 later",
                    ),
                )
            for s in changed:
                say(f"op {op} {s.id} {s.seq}")
        except (MessageBusy, MessageNotFound):
            with ids_lock:
                if target in ids and not spool.layout.sidecar(target).exists():
                    ids.remove(target)


def main() -> None:
    data, seed = sys.argv[1], int(sys.argv[2])
    spool = Spool.open(load_config(data_dir=data), actor="crash-test")
    ids = spool.ids()
    lock = threading.Lock()
    say("ready")
    threads = [
        threading.Thread(target=worker, args=(spool, random.Random(seed * 10 + i), ids, lock), daemon=True)
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)  # the parent kills us long before


if __name__ == "__main__":
    main()
