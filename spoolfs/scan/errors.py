"""The scanners' one error, and the connection both clients share.

Failure rules: OSError while connecting, a timeout, an early close or an
answer that does not parse all become ScannerError(scanner, reason), with
the cause chained. The reason is one line, fit for an event and a log.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from events.errors import SpoolError
from spoolfs.config import parse_scanner_address


class ScannerError(SpoolError):
    """A scanner gave no verdict: down, too slow, or it answered nonsense."""

    def __init__(self, scanner: str, reason: str) -> None:
        super().__init__(f"{scanner}: {reason}")
        self.scanner = scanner
        self.reason = reason


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@contextlib.asynccontextmanager
async def round_trip(scanner: str, address: str, timeout: float) -> AsyncIterator[Stream]:
    """A fresh connection to `address` (HOST:PORT or a unix socket path), closed
    afterwards; everything inside the block must finish within `timeout` seconds."""
    target = parse_scanner_address(address)
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            try:
                if isinstance(target, str):
                    reader, writer = await asyncio.open_unix_connection(target)
                else:
                    reader, writer = await asyncio.open_connection(*target)
            except OSError as exc:
                raise ScannerError(scanner, f"cannot connect to {address}: {exc.strerror or exc}") from exc
            yield reader, writer
    except TimeoutError as exc:
        raise ScannerError(scanner, f"no answer from {address} within {timeout:g} s") from exc
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        raise ScannerError(scanner, f"connection to {address} failed: {exc}") from exc
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
