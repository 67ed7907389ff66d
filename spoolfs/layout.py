"""Where each file of the data directory lives.

    DATA/spool/NN/ID.eml   DATA/spool/NN/ID.json   DATA/spool/tmp/
    DATA/spool/corrupt/    DATA/events/            DATA/quarantine/

NN is crc32(ID) modulo the subspool count, as two hex digits. The count is
fixed when a spool is created (recorded in spool/SUBSPOOLS): changing it in
the config later is a ConfigError, not a silent loss of every message.
"""

from __future__ import annotations

import zlib
from pathlib import Path

from events.errors import ConfigError
from spoolfs.durable import translate, write_durably


class Layout:
    def __init__(self, data_dir: Path, subspools: int) -> None:
        self.data = Path(data_dir)
        self.spool = self.data / "spool"
        self.tmp = self.spool / "tmp"
        self.corrupt = self.spool / "corrupt"
        self.events = self.data / "events"
        self.quarantine = self.data / "quarantine"
        self.subspools = subspools
        # joined once: path building showed in the profile of SMTP ingest
        self._dirs = [self.spool / f"{n:02x}" for n in range(subspools)] if subspools > 0 else []

    def create(self) -> None:
        """Make the directories; pin or check the subspool count."""
        try:
            for d in (self.spool, self.tmp, self.corrupt, self.events, self.quarantine):
                d.mkdir(parents=True, exist_ok=True)
            marker = self.spool / "SUBSPOOLS"
            if marker.exists():
                pinned = int(marker.read_text().strip() or "0")
                if pinned != self.subspools:
                    raise ConfigError(
                        f"config error: subspools: this spool was created with {pinned} "
                        f"subspools ({marker}); the config says {self.subspools}"
                    )
            else:
                write_durably(self.tmp / "SUBSPOOLS.tmp", marker, f"{self.subspools}\n".encode())
            for nn in self.subspool_names():
                (self.spool / nn).mkdir(exist_ok=True)
        except OSError as exc:
            raise translate(exc, f"cannot create the spool in {self.data}") from exc
        except ValueError as exc:
            raise ConfigError(f"config error: subspools: unreadable {self.spool / 'SUBSPOOLS'}") from exc

    def subspool_names(self) -> list[str]:
        return [f"{n:02x}" for n in range(self.subspools)]

    def subspool_index(self, message_id: str) -> int:
        return zlib.crc32(message_id.encode()) % self.subspools

    def subspool_of(self, message_id: str) -> str:
        return f"{self.subspool_index(message_id):02x}"

    def eml(self, message_id: str) -> Path:
        return self._dirs[self.subspool_index(message_id)] / f"{message_id}.eml"

    def sidecar(self, message_id: str) -> Path:
        return self._dirs[self.subspool_index(message_id)] / f"{message_id}.json"

    def tmp_eml(self, message_id: str) -> Path:
        return self.tmp / f"{message_id}.eml"

    def tmp_sidecar(self, message_id: str) -> Path:
        return self.tmp / f"{message_id}.json"
