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


async def _run(name: str, config: Config) -> None:
    spool = Spool.open(config, actor=name)
    try:
        service = make_service(name, config, spool)
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
