"""clamd over its own protocol: `zINSTREAM`, the message in length-prefixed
chunks, a zero-length chunk, then one NUL-terminated answer:

    stream: OK                     clean
    stream: NAME FOUND             infected (NAME, e.g. Eicar-Test-Signature)
    ... ERROR                      clamd could not scan it (size limit, ...)

Failure rules: anything but OK or FOUND is a ScannerError; so is a closed
connection (clamd closes when a stream exceeds its StreamMaxLength).
"""

from __future__ import annotations

import struct

from spoolfs.scan.errors import ScannerError, round_trip

CHUNK = 64 * 1024
NAME = "clamd"


class ClamdClient:
    name = NAME

    def __init__(self, address: str, *, timeout: float = 30.0) -> None:
        self.address = address
        self.timeout = timeout

    async def scan(self, data: bytes) -> str:
        """The signature name clamd found in `data`, or "" when it is clean."""
        async with round_trip(NAME, self.address, self.timeout) as (reader, writer):
            writer.write(b"zINSTREAM\0")
            view = memoryview(data)
            for start in range(0, len(view), CHUNK):
                piece = view[start : start + CHUNK]
                writer.write(struct.pack(">I", len(piece)))
                writer.write(piece)
                await writer.drain()
            writer.write(struct.pack(">I", 0))
            await writer.drain()
            answer = (await reader.readuntil(b"\0"))[:-1].decode("utf-8", "replace").strip()
        return parse_answer(answer)

    async def ping(self) -> None:
        async with round_trip(NAME, self.address, self.timeout) as (reader, writer):
            writer.write(b"zPING\0")
            answer = (await reader.readuntil(b"\0"))[:-1]
        if answer != b"PONG":
            raise ScannerError(NAME, f"unexpected answer to PING: {answer[:80]!r}")


def parse_answer(answer: str) -> str:
    """'stream: OK' -> ''; 'stream: NAME FOUND' -> NAME; anything else raises."""
    _, _, result = answer.partition(": ")
    if result == "OK":
        return ""
    if result.endswith(" FOUND") and len(result) > len(" FOUND"):
        return result[: -len(" FOUND")]
    raise ScannerError(NAME, f"could not scan: {answer[:200]}")
