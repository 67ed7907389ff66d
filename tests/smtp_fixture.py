"""An in-process SMTP server on an ephemeral loopback port, for tests.

The server runs its own event loop in a thread, so tests talk to it with
blocking clients (smtplib, raw sockets, swaks) exactly as real clients do.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec

from spoolfs.config import Config, load_config
from spoolfs.smtp.server import SmtpServer, listen_socket
from spoolfs.spool import Spool


def make_config(data: Path, **smtp: Any) -> Config:
    config = load_config(data_dir=str(data))
    return msgspec.structs.replace(
        config, smtp=msgspec.structs.replace(config.smtp, listen="127.0.0.1:0", **smtp)
    )


class Running:
    def __init__(
        self, config: Config, spool: Spool, server: SmtpServer, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.config = config
        self.spool = spool
        self.server = server
        self.loop = loop
        self.port = server.port


@contextmanager
def smtp_server(data: Path, **smtp: Any) -> Iterator[Running]:
    config = make_config(data, **smtp)
    spool = Spool.open(config, actor="smtp")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = SmtpServer(config, spool)
    sock = listen_socket("127.0.0.1:0", reuse_port=False)
    asyncio.run_coroutine_threadsafe(server.start(sock), loop).result(10)
    try:
        yield Running(config, spool, server, loop)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(grace=2), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        spool.close()
