"""events: the vocabulary and the append-only log. Imports nothing of ours."""

from events.errors import ChainBroken, ConfigError, LogError, SpoolError, StorageFull
from events.log import EventLog
from events.reader import follow, head_seq, last_records, line_hash, read_records
from events.schema import EVENT_TYPES, Event, Record
from events.verify import VerifyResult, verify

__all__ = [
    "EVENT_TYPES",
    "ChainBroken",
    "ConfigError",
    "Event",
    "EventLog",
    "LogError",
    "Record",
    "SpoolError",
    "StorageFull",
    "VerifyResult",
    "follow",
    "head_seq",
    "last_records",
    "line_hash",
    "read_records",
    "verify",
]
