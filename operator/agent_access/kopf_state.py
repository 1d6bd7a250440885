"""kopf's per-object bookkeeping, kept in memory instead of on the object.

kopf normally stores handler progress and the last handled spec in annotations
of the object itself, which anyone who may patch an AgentTask can write: a
planted "last handled" record made `cancel` a no-op and deletion skip
revocation. Here neither is read from the object. After a restart every task is
handled afresh, which the service does idempotently (it decides from the
operator's own objects, see recovery.py).
"""

from __future__ import annotations

import copy
import json
import threading
import zlib
from typing import Any

import kopf


def _uid(body: Any) -> str:
    return str(body.get("metadata", {}).get("uid", ""))


class MemoryProgressStorage(kopf.AnnotationsProgressStorage):
    """Progress records in memory; only the "touch" nudge (which makes kopf see the
    object again after a delay) is still written to the object, and never read."""

    def __init__(self, prefix: str):
        super().__init__(prefix=prefix)
        self._records: dict[str, dict[str, Any]] = {}  # uid -> handler key -> record
        self._lock = threading.Lock()

    def fetch(self, *, key: Any, body: Any) -> Any:
        with self._lock:
            return copy.deepcopy(self._records.get(_uid(body), {}).get(str(key)))

    def store(self, *, key: Any, record: Any, body: Any, patch: Any) -> None:
        with self._lock:
            self._records.setdefault(_uid(body), {})[str(key)] = copy.deepcopy(dict(record))

    def purge(self, *, key: Any, body: Any, patch: Any) -> None:
        with self._lock:
            records = self._records.get(_uid(body))
            if records is not None:
                records.pop(str(key), None)
                if not records:
                    del self._records[_uid(body)]

    def forget(self, uid: str) -> None:
        with self._lock:
            self._records.pop(uid, None)


class MemoryDiffBaseStorage(kopf.DiffBaseStorage):
    """The last handled essence of each object, in memory, compressed (an essence is a
    task's spec and metadata: at 10,000 live tasks, dicts cost ~10x their JSON)."""

    def __init__(self) -> None:
        super().__init__()
        self._essences: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def fetch(self, *, body: Any) -> Any:
        with self._lock:
            packed = self._essences.get(_uid(body))
        return None if packed is None else json.loads(zlib.decompress(packed))

    def store(self, *, body: Any, patch: Any, essence: Any) -> None:
        packed = zlib.compress(json.dumps(essence, separators=(",", ":")).encode(), 1)
        with self._lock:
            self._essences[_uid(body)] = packed

    def forget(self, uid: str) -> None:
        with self._lock:
            self._essences.pop(uid, None)
