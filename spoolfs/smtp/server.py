"""Start the SMTP listener in the running event loop.

Each SMTP worker process binds its own socket with SO_REUSEPORT, so the
kernel spreads connections over the workers and one worker dying does not
close the port for the others.

Failure rules: a port that cannot be bound raises SpoolError naming the
address (exit 1 in the CLI, the supervisor logs it and retries). The
protocol log is written in batches (spoolfs.protolog); `stop()` writes what
is waiting, so only a killed worker loses its last fraction of a second.
"""

from __future__ import annotations

import asyncio
import socket
from concurrent.futures import ThreadPoolExecutor

from events.errors import SpoolError
from spoolfs.config import Config, parse_hostport
from spoolfs.protolog import ProtocolLog
from spoolfs.quarantine import Quarantine
from spoolfs.scan.gate import ScanGate
from spoolfs.scan.scanner import Scanner
from spoolfs.smtp.handler import SpoolHandler
from spoolfs.smtp.policy import RelayPolicy
from spoolfs.smtp.protocol import ConnectionCounter, SpoolSMTP
from spoolfs.spool import Spool
from spoolfs.users import Users

PROTOLOG_FLUSH = 0.2  # seconds a protocol log line may wait in memory


def listen_socket(address: str, *, reuse_port: bool = True) -> socket.socket:
    host, port = parse_hostport(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise SpoolError(f"cannot listen on {address}: {exc.strerror}") from exc
    return sock


class SmtpServer:
    """The SMTP service of one worker process."""

    def __init__(self, config: Config, spool: Spool, *, threads: int = 64) -> None:
        self.config = config
        self.spool = spool
        # a diagnostic log: batched, about eight lines a message (stop() writes the rest)
        self.protolog = ProtocolLog(spool.layout.data / "log", "smtp", flush_interval=PROTOLOG_FLUSH)
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="enqueue")
        self.counter = ConnectionCounter(config.smtp.max_connections_per_client)
        self.users = Users(spool.layout.data, config.smtp.local_domains)
        self.handler = self._handler(config)
        self.server: asyncio.Server | None = None

    def _handler(self, config: Config) -> SpoolHandler:
        policy = RelayPolicy(config.smtp.local_domains, config.smtp.mynetworks, self.users)
        return SpoolHandler(
            self.spool,
            policy,
            hostname=config.smtp.hostname or config.node,
            max_recipients=config.smtp.max_recipients,
            protolog=self.protolog,
            executor=self.executor,
            scan=self._scan_gate(config),
        )

    def _scan_gate(self, config: Config) -> ScanGate | None:
        if not config.scan.enabled:
            return None
        quarantine = Quarantine.for_spool(self.spool, config)
        return ScanGate(Scanner.from_config(config.scan), quarantine, config.scan)

    def reload(self, config: Config) -> None:
        """Take new policy and limits; connections already open keep the old ones."""
        self.config = config
        self.users = Users(self.spool.layout.data, config.smtp.local_domains)
        self.counter.limit = config.smtp.max_connections_per_client
        self.handler = self._handler(config)

    def _protocol(self) -> SpoolSMTP:
        smtp = self.config.smtp
        return SpoolSMTP(
            self.handler,
            counter=self.counter,
            protolog=self.protolog,
            max_line_length=smtp.max_line_length,
            data_size_limit=smtp.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=smtp.hostname or self.config.node,
            ident="spoolfs",
            timeout=smtp.command_timeout,
            # aiosmtpd would look the loop up under warnings.catch_warnings()
            # for every connection; the factory always runs in this loop
            loop=asyncio.get_running_loop(),
        )

    async def start(self, sock: socket.socket | None = None) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        if sock is None:
            sock = listen_socket(self.config.smtp.listen)
        self.server = await loop.create_server(self._protocol, sock=sock)
        return self.server

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting; give transactions in flight `grace` seconds."""
        if self.server is not None:
            self.server.close()
            try:
                await asyncio.wait_for(self.server.wait_closed(), grace)
            except TimeoutError:
                pass
        self.executor.shutdown(wait=True)
        self.protolog.close()
