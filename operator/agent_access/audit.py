"""The audit trail: one JSON line per decision (grant, denial, revocation, expiry).

Lines go to stdout and, when configured, are appended to a file. The token is
never part of a record: records are built only from the fields listed in
docs/audit.md.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

SCHEMA_VERSION = 1
#: More uses than this in one task's text timeline are shown as counts per call.
AGGREGATE_ABOVE = 20
log = logging.getLogger(__name__)


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
    requester: Mapping[str, Any] | None = None,
    detail: str | None = None,
    now: datetime | None = None,
    approval: Mapping[str, Any] | None = None,
    approvals: Sequence[Mapping[str, Any]] | None = None,
    stage: str | None = None,
) -> dict[str, Any]:
    """Build one audit record; purely computational. `approval` (one decision, on
    `approval` lines) and `approvals` (those a grant or denial rests on) appear only
    when given."""
    meta = task.get("metadata", {})
    spec = task.get("spec") or {}
    return (
        {
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
            "requester": dict(requester) if requester else None,
            "audiences": list(spec.get("audiences") or []),
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
            "detail": detail,
        }
        | ({"approval": dict(approval)} if approval is not None else {})
        | ({"approvals": [dict(a) for a in approvals]} if approvals is not None else {})
        | ({"stage": stage} if stage is not None else {})
    )


class AuditLog:
    def __init__(
        self,
        stream: TextIO | None = None,
        path: str | None = None,
        listeners: Sequence[Callable[[Mapping[str, Any]], None]] = (),
    ):
        self.stream = stream if stream is not None else sys.stdout
        self.path = path
        #: told of every record once it is written (notifications); must not block
        self.listeners = tuple(listeners)
        self._lock = threading.Lock()

    def write(self, entry: Mapping[str, Any]) -> None:
        self.write_many([entry])

    def write_many(self, entries: Sequence[Mapping[str, Any]]) -> None:
        """Write lines in order, with one flush (the use log writes them in batches)."""
        text = "".join(
            json.dumps(e, ensure_ascii=True, separators=(",", ":"), default=str) + "\n"
            for e in entries
        )
        with self._lock:
            self.stream.write(text)
            self.stream.flush()
            if self.path:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(text)
            # inside the lock, so listeners see records in the order of the lines
            # (they only enqueue: never blocking)
            for entry in entries:
                for listener in self.listeners:
                    try:
                        listener(entry)
                    except Exception:
                        log.exception("audit listener failed")


# ---------------------------------------------------------------------------
# Reconstruction: an agent's path from status, Events and audit lines.

_EVENT_OF_REASON = {
    "PolicyAllowed": "granted",
    "TTLExpired": "expired",
    "IdleTimeout": "expired",
    "TaskDeleted": "deleted",
}
_DENIALS = {
    "NoMatchingPolicy",
    "RuleNotAllowed",
    "Forbidden",
    "InvalidSpec",
    "AgentNotFound",
    "PodNotFound",
    "RequesterNotAllowed",
    "AudienceNotAllowed",
    "AgentSuspended",
}


def _event_name(reason: str, phase: str | None = None) -> str:
    if reason in _EVENT_OF_REASON:
        return _EVENT_OF_REASON[reason]
    if reason in _DENIALS and phase in (None, "Denied"):
        return "denied"
    return "revoked"


def _sortable(time: str | None) -> str:
    """RFC 3339 with or without fractions, comparable as text (…05Z -> …05.000000Z)."""
    if not time:
        return ""
    base = time.rstrip("Z")
    if "." not in base:
        base += ".000000"
    whole, frac = base.split(".", 1)
    return f"{whole}.{frac[:6]:0<6}Z"


def _epoch(time: str | None) -> float | None:
    if not time:
        return None
    try:
        return datetime.strptime(_sortable(time)[:26], "%Y-%m-%dT%H:%M:%S.%f").timestamp()
    except ValueError:
        return None


def _rules_text(access: Sequence[Mapping[str, Any]]) -> str:
    parts = []
    for entry in access or ():
        for rule in entry.get("rules") or ():
            verbs = ",".join(rule.get("verbs") or ())
            res = ",".join(rule.get("resources") or ())
            names = rule.get("resourceNames")
            parts.append(
                f"{verbs} {res}"
                + (f" ({','.join(names)})" if names else "")
                + f" in {entry.get('namespace') or '(own namespace)'}"
            )
    return "; ".join(parts)


def timeline(
    task: Mapping[str, Any] | None,
    events: Sequence[Mapping[str, Any]] = (),
    lines: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """One task's path, oldest first, from whatever sources exist. Purely computational.

    `task` may be None (deleted): audit lines alone are enough to rebuild the path.
    """
    entries: list[dict[str, Any]] = []
    meta = (task or {}).get("metadata", {})
    spec = (task or {}).get("spec") or {}
    status = (task or {}).get("status") or {}
    first = lines[0] if lines else {}
    header = {
        "name": meta.get("name") or first.get("task", {}).get("name"),
        "namespace": meta.get("namespace") or first.get("task", {}).get("namespace"),
        "uid": meta.get("uid") or first.get("task", {}).get("uid"),
        "agent": spec.get("agent") or first.get("agent"),
        "intent": spec.get("intent") or first.get("intent"),
        "podName": spec.get("podName") or first.get("podName"),
        "phase": status.get("phase") or (lines[-1].get("phase") if lines else None),
        "reason": status.get("reason") or (lines[-1].get("reason") if lines else None),
    }
    if task:
        entries.append(
            {
                "time": meta.get("creationTimestamp"),
                "source": "status",
                "event": "requested",
                "reason": None,
                "message": _rules_text(spec.get("access") or []),
                "ttl": spec.get("ttl"),
            }
        )
        if status.get("grantedAt"):
            entries.append(
                {
                    "time": status["grantedAt"],
                    "source": "status",
                    "event": "granted",
                    "reason": "PolicyAllowed",
                    "message": f"until {status.get('expiresAt')} by "
                    f"{', '.join(status.get('policies') or [])}",
                    "grants": status.get("grants") or [],
                    "serviceAccount": status.get("serviceAccountName"),
                }
            )
        if status.get("endedAt") and status.get("phase") not in (None, "Active", "Pending"):
            entries.append(
                {
                    "time": status["endedAt"],
                    "source": "status",
                    "event": _event_name(status.get("reason", ""), status.get("phase")),
                    "reason": status.get("reason"),
                    "message": status.get("message"),
                }
            )

    # Anyone who may create Events in the namespace can write one that looks like the
    # operator's: an Event counts as verified only when an audit line agrees with it
    # (same reason, its message, within two seconds).
    def confirmed(ev: Mapping[str, Any], when: str | None) -> bool:
        moment = _epoch(when)
        return any(
            line.get("reason") == ev.get("reason")
            and str(ev.get("message") or "").startswith(str(line.get("message") or ""))
            and moment is not None
            and (other := _epoch(line.get("time"))) is not None
            and abs(other - moment) <= 2
            for line in lines
        )

    for ev in events:
        when = ev.get("lastTimestamp") or ev.get("eventTime") or ev.get("firstTimestamp")
        entries.append(
            {
                "time": when,
                "source": "event",
                "event": _event_name(
                    ev.get("reason", ""), "Denied" if ev.get("type") == "Warning" else "Active"
                ),
                "reason": ev.get("reason"),
                "message": ev.get("message"),
                "verified": confirmed(ev, when),
            }
        )
    for line in lines:
        if line.get("event") == "used":  # a call of the per-task identity: kept whole
            use = {k: v for k, v in line.items() if k not in ("source", "schemaVersion", "task")}
            entries.append({**use, "source": "use", "via": line.get("source")})
            continue
        entries.append(
            {
                "time": line.get("time"),
                "source": "audit",
                "event": line.get("event"),
                "reason": line.get("reason"),
                "message": line.get("message"),
                "grantedRules": line.get("grantedRules") or None,
                "policies": line.get("policies") or None,
            }
        )
    rank = {"status": 0, "event": 1, "audit": 2, "use": 3}
    entries.sort(key=lambda e: (_sortable(e["time"]), rank[e["source"]]))
    return {
        "task": header,
        "timeline": [{k: v for k, v in e.items() if v is not None} for e in entries],
    }


def safe(value: object) -> str:
    """Printable text: control characters (terminal escapes, newlines, bidi overrides)
    written by users are shown escaped, never interpreted by the terminal."""
    text = "" if value is None else str(value)
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )


def render_text(paths: Sequence[Mapping[str, Any]]) -> str:
    out = []
    for path in paths:
        t = {k: safe(v) if v is not None else None for k, v in path["task"].items()}
        out.append(f"AgentTask {t['namespace']}/{t['name']}  (uid {t['uid']})")
        out.append(
            f"  agent:  {t['agent']}" + (f"   pod: {t['podName']}" if t.get("podName") else "")
        )
        out.append(f"  intent: {t['intent']}")
        out.append(
            f"  now:    {t['phase'] or 'unknown'}"
            + (f" ({t['reason']})" if t.get("reason") else "")
        )
        uses = [e for e in path["timeline"] if e["source"] == "use"]
        many = len(uses) > AGGREGATE_ABOVE
        for e in path["timeline"]:
            if e["source"] == "use":
                if not many:
                    out.append(
                        f"  {safe(e.get('time') or '')[:19]:<19}  used      "
                        f"{safe(e.get('via')):<6} "
                        f"{safe(e.get('decision')):<17} {safe(what(e))}"
                        + (f"  ({safe(e.get('reason'))})" if e.get("reason") else "")
                    )
                continue
            reason = safe(e.get("reason") or "")
            source = e["source"]
            if source == "event" and not e.get("verified"):
                source = "event?"  # not confirmed by an audit line: may be forged
            out.append(
                f"  {safe(e.get('time') or '')[:19]:<19}  {safe(e['event']):<9} {source:<6} "
                f"{reason:<17} {safe(e.get('message') or '')}".rstrip()
            )
        if many:
            out.append(f"  uses: {len(uses)} calls (counts per call; -o json lists each)")
            for group in summarize(uses):
                out.append(
                    f"  {group['count']:>7}x  {safe(group['call'])}  [{safe(group['decision'])}]"
                    f"  {safe(group['first'])[:19]} .. {safe(group['last'])[:19]}"
                )
        if any(e["source"] == "event" and not e.get("verified") for e in path["timeline"]):
            out.append(
                "  (event? = a Kubernetes Event no audit line confirms: anyone who may create "
                "Events in the namespace can write one; pass --audit-file to verify)"
            )
        out.append("")
    return "\n".join(out)


def what(line: Mapping[str, Any]) -> str:
    """`get pods/log in payments`, `get /version`: a call, briefly."""
    if line.get("path"):
        return f"{line.get('verb')} {line.get('path')}"
    resource = str(line.get("resource") or "")
    if line.get("subresource"):
        resource += f"/{line['subresource']}"
    if line.get("apiGroup"):
        resource += f".{line['apiGroup']}"
    where = f" in {line['namespace']}" if line.get("namespace") else ""
    name = f" {line['name']}" if line.get("name") else ""
    return f"{line.get('verb')} {resource}{name}{where}"


def summarize(uses: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Counts per (call, decision), with first and last time."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for line in uses:
        key = (what(line), str(line.get("decision") or ""))
        time = str(line.get("time") or "")
        group = groups.get(key)
        if group is None:
            groups[key] = {"call": key[0], "decision": key[1], "count": 1,
                           "first": time, "last": time}  # fmt: skip
        else:
            group["count"] += 1
            group["first"] = min(group["first"], time)
            group["last"] = max(group["last"], time)
    return sorted(groups.values(), key=lambda g: (g["first"], g["call"]))
