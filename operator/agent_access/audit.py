"""The audit trail: one JSON line per decision (grant, denial, revocation, expiry).

Lines go to stdout and, when configured, are appended to a file. The token is
never part of a record: records are built only from the fields listed in
docs/audit.md.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

SCHEMA_VERSION = 1


def record(
    event: str,
    task: Mapping[str, Any],
    *,
    reason: str,
    phase: str,
    message: str,
    requested: Sequence[Mapping[str, Any]] = (),
    granted: Sequence[Mapping[str, Any]] = (),
    policies: Sequence[Mapping[str, str]] = (),
    objects: Sequence[Mapping[str, str]] = (),
    granted_at: str | None = None,
    expires_at: str | None = None,
    ended_at: str | None = None,
    trigger: str | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Build one audit record; purely computational."""
    meta = task.get("metadata", {})
    spec = task.get("spec") or {}
    return {
        "schemaVersion": SCHEMA_VERSION,
        "time": (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "event": event,
        "task": {
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "uid": meta.get("uid"),
        },
        "agent": spec.get("agent"),
        "intent": spec.get("intent"),
        "podName": spec.get("podName"),
        "phase": phase,
        "reason": reason,
        "message": message,
        "trigger": trigger,
        "namespaces": sorted({e.get("namespace") or meta.get("namespace") for e in requested}),
        "requestedRules": list(requested),
        "grantedRules": list(granted),
        "policies": list(policies),
        "objects": list(objects),
        "grantedAt": granted_at,
        "expiresAt": expires_at,
        "endedAt": ended_at,
    }


class AuditLog:
    def __init__(self, stream: TextIO | None = None, path: str | None = None):
        self.stream = stream if stream is not None else sys.stdout
        self.path = path
        self._lock = threading.Lock()

    def write(self, entry: Mapping[str, Any]) -> None:
        line = json.dumps(entry, ensure_ascii=True, separators=(",", ":"), default=str)
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()
            if self.path:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(line + "\n")
