"""One worker process: `python -m spoolfs.serve.worker SERVICE`.

The supervisor passes the configuration through the environment
(SPOOL_CONFIG, SPOOL_DATA_DIR, SPOOL_OVERRIDES as JSON). SIGTERM or SIGINT
stops the service gracefully; SIGHUP reloads the configuration (a bad new
configuration is reported and the old one kept).

Failure rules: a configuration error exits 2, anything else escaping the
service exits 1 with one line on stderr; the supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import msgspec

from events.errors import SpoolError
from spoolfs.config import Config, Overrides, apply_overrides, load_config
from spoolfs.serve.services import make_service
from spoolfs.spool import Spool


def worker_config() -> Config:
    config = load_config()
    raw = os.environ.get("SPOOL_OVERRIDES")
    if raw:
        config = apply_overrides(config, msgspec.json.decode(raw, type=Overrides))
    return config


def shard() -> tuple[int, int]:
    """This process's share of the subspools: SPOOL_SHARD=k/n (default 0/1)."""
    k, _, n = os.environ.get("SPOOL_SHARD", "0/1").partition("/")
    try:
        share = int(k), int(n)
    except ValueError:
        share = (0, 0)
    if not 0 <= share[0] < share[1]:
        raise SpoolError(f"SPOOL_SHARD must be K/N with 0 <= K < N, not {os.environ['SPOOL_SHARD']!r}")
    return share


def recover(config: Config) -> None:
    """The recovery fsck at start (run by the supervisor, in this process of its own).

    It replays the log from the checkpoint the previous recovery left, and
    leaves a new one for the next."""
    from spoolfs import checkpoint
    from spoolfs.fsck import check, replay_log

    with Spool.open(config, actor="system") as spool:
        start, why = checkpoint.load(spool.layout)
        if start is None and why != "no checkpoint":
            print(f"recovery: {why}", flush=True)
        report, state = check(spool, replay_log(spool, start), repair=True, tmp_age=0)
        checkpoint.save(spool.layout, state)
    mended = [p for p in report.problems if p.repaired]
    if report.problems:
        print(f"recovery: {len(mended)} of {len(report.problems)} problems repaired", flush=True)
        for p in report.problems:
            print(f"  {p.kind} {p.id} {p.detail}{'' if p.repaired else ' [NOT repaired]'}", flush=True)


# A checkpoint holds every queued message's state, and making one takes about
# 2.5 KB of memory a message (241 MB for 100,000). While the server runs, it
# is skipped above this many, so that it never doubles the server's memory
# during a backlog; the next start then replays more of the log.
CHECKPOINT_MAX_SPOOL = 25_000


def advance_checkpoint(config: Config) -> None:
    """Move the replay checkpoint up to the log's head (run by the supervisor, in this process of its own)."""
    from spoolfs import checkpoint

    with Spool.open(config, actor="system") as spool:
        queued = len(spool.ids())
        if queued > CHECKPOINT_MAX_SPOOL:
            print(
                f"checkpoint: skipped, {queued} messages queued (more than {CHECKPOINT_MAX_SPOOL})",
                flush=True,
            )
            return
        checkpoint.advance(spool.layout)


async def _run(name: str, config: Config) -> None:
    spool = Spool.open(config, actor=name)
    try:
        service = make_service(name, config, spool, shard=shard())
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)

        def reload() -> None:
            try:
                service.reload(worker_config())
            except SpoolError as exc:
                print(f"spool {name}: reload refused: {exc}", file=sys.stderr, flush=True)

        loop.add_signal_handler(signal.SIGHUP, reload)
        await service.run(stop)
    finally:
        spool.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m spoolfs.serve.worker SERVICE", file=sys.stderr)
        return 2
    name = args[0]
    try:
        config = worker_config()
        if name == "recover":
            recover(config)
            return 0
        if name == "checkpoint":
            advance_checkpoint(config)
            return 0
        try:
            import uvloop  # a faster event loop when installed

            uvloop.run(_run(name, config))
        except ImportError:
            asyncio.run(_run(name, config))
    except SpoolError as exc:
        print(f"spool {name}: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
