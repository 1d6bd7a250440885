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
import threading
from typing import Any

import kopf


def _uid(body: Any) -> str:
    return str(body.get("metadata", {}).get("uid", ""))


class MemoryProgressStorage(kopf.AnnotationsProgressStorage):
    """Progress records in memory; only the "touch" nudge (which makes kopf see the
    object again after a delay) is still written to the object, and never read."""

    def __init__(self, prefix: str):
        super().__init__(prefix=prefix)
        self._records: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def fetch(self, *, key: Any, body: Any) -> Any:
        with self._lock:
            return copy.deepcopy(self._records.get((_uid(body), str(key))))

    def store(self, *, key: Any, record: Any, body: Any, patch: Any) -> None:
        with self._lock:
            self._records[(_uid(body), str(key))] = copy.deepcopy(dict(record))

    def purge(self, *, key: Any, body: Any, patch: Any) -> None:
        with self._lock:
            self._records.pop((_uid(body), str(key)), None)

    def forget(self, uid: str) -> None:
        with self._lock:
            for k in [k for k in self._records if k[0] == uid]:
                del self._records[k]


class MemoryDiffBaseStorage(kopf.DiffBaseStorage):
    """The last handled essence of each object, in memory."""

    def __init__(self) -> None:
        super().__init__()
        self._essences: dict[str, Any] = {}
        self._lock = threading.Lock()

    def fetch(self, *, body: Any) -> Any:
        with self._lock:
            return copy.deepcopy(self._essences.get(_uid(body)))

    def store(self, *, body: Any, patch: Any, essence: Any) -> None:
        with self._lock:
            self._essences[_uid(body)] = copy.deepcopy(essence)

    def forget(self, uid: str) -> None:
        with self._lock:
            self._essences.pop(uid, None)
