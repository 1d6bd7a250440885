"""The use log: one `used` audit line per call of a per-task identity.

Two sources give the same lines (purely computational here):

- the authorization webhook (gate.py): every call it is asked about, with its own
  decision (`deny`, or `no-opinion`: RBAC decides) and how long it took;
- the API server's audit events (audit.k8s.io/v1, from its log file or its audit
  webhook backend): every call with the API server's final decision (`allow` or
  `forbid`) and response code, for clusters where the webhook cannot be installed.

`audit.summarize` folds many uses into counts per call for the timeline.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from .audit import SCHEMA_VERSION
from .authz import Call, TaskEntry, credential_of, epoch, identity_of

AUTHORIZER, AUDIT = "authorizer", "audit"
_DECISION = "authorization.k8s.io/decision"
_REASON = "authorization.k8s.io/reason"


def _ts(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _task_fields(entry: TaskEntry | None) -> dict[str, Any]:
    if entry is None:
        return {"task": None, "agent": None, "requester": None}
    return {
        "task": {"name": entry.name, "namespace": entry.namespace, "uid": entry.uid},
        "agent": entry.agent,
        "requester": entry.requester,
    }


def used_line(
    call: Call,
    entry: TaskEntry | None,
    decision: str,
    reason: str,
    now: datetime,
    latency_ms: float | None = None,
    source: str = AUTHORIZER,
    code: int | None = None,
    audit_id: str | None = None,
    event: str = "used",
) -> dict[str, Any]:
    """`event`: `used` for a call made with the task's token, `checked` for a review
    that carries no such credential (a SubjectAccessReview someone created about the
    identity, an impersonation): logged, never counted as a use."""
    line: dict[str, Any] = {
        "schemaVersion": SCHEMA_VERSION,
        "time": _ts(now),
        "event": event,
        **_task_fields(entry),
        "identity": f"{call.home}/{call.identity}",
        "verb": call.verb,
        "apiGroup": call.api_group,
        "resource": call.resource,
        "subresource": call.subresource,
        "namespace": call.namespace,
        "name": call.name,
        "decision": decision,
        "reason": reason,
        "latencyMs": round(latency_ms, 3) if latency_ms is not None else None,
        "source": source,
    }
    if call.path:
        line["path"] = call.path
    if code is not None:
        line["code"] = code
    if audit_id:
        line["auditID"] = audit_id
    return line


def _time(text: Any) -> datetime | None:
    moment = epoch(text)
    return datetime.fromtimestamp(moment, UTC) if moment is not None else None


def call_of_event(event: Mapping[str, Any]) -> tuple[Call, datetime, dict[str, Any]] | None:
    """A finished call of a per-task identity in an audit.k8s.io/v1 Event: the call, when
    it ended, and what the API server decided; None for anything else."""
    if not isinstance(event, Mapping) or event.get("stage") not in ("ResponseComplete", "Panic"):
        return None
    impersonated = event.get("impersonatedUser")
    user = impersonated or event.get("user")
    username = user.get("username") if isinstance(user, Mapping) else None
    # someone acting as the identity: whatever credential id they claim, not its call
    extra = None if impersonated else (user.get("extra") if isinstance(user, Mapping) else None)
    who = identity_of(username) if isinstance(username, str) else None
    if who is None:
        return None
    ref = event.get("objectRef")
    ref = ref if isinstance(ref, Mapping) else {}

    def text(raw: Mapping[str, Any], key: str) -> str:
        value = raw.get(key)
        return value if isinstance(value, str) else ""

    call = Call(
        user=str(username),
        home=who[0],
        identity=who[1],
        verb=text(event, "verb"),
        api_group=text(ref, "apiGroup"),
        resource=text(ref, "resource"),
        subresource=text(ref, "subresource"),
        namespace=text(ref, "namespace"),
        name=text(ref, "name"),
        path="" if ref else text(event, "requestURI")[:512],
        credential=credential_of(extra),
    )
    ended = _time(event.get("stageTimestamp")) or datetime.now(UTC)
    started = _time(event.get("requestReceivedTimestamp"))
    notes = event.get("annotations")
    notes = notes if isinstance(notes, Mapping) else {}
    status = event.get("responseStatus")
    code = status.get("code") if isinstance(status, Mapping) else None
    return (
        call,
        ended,
        {
            "decision": str(
                notes.get(_DECISION) or ("panic" if event.get("stage") == "Panic" else "")
            ),
            "reason": str(notes.get(_REASON) or "")[:1024],
            "code": code if isinstance(code, int) else None,
            "latency_ms": (ended - started).total_seconds() * 1000 if started else None,
            "audit_id": text(event, "auditID") or None,
        },
    )


def events_of(body: Any) -> Iterator[Mapping[str, Any]]:
    """The Events of an audit webhook POST (an EventList) or of one log line (an Event)."""
    if not isinstance(body, Mapping):
        return
    if body.get("kind") == "EventList":
        items = body.get("items")
        for item in items if isinstance(items, list) else ():
            if isinstance(item, Mapping):
                yield item
    elif body.get("kind") == "Event":
        yield body


def line_of_event(event: Mapping[str, Any], entry_for: Any) -> dict[str, Any] | None:
    """The `used` line for one audit Event (`entry_for(namespace, identity)` gives the
    task), or None when it is not a finished call of a per-task identity."""
    found = call_of_event(event)
    if found is None:
        return None
    call, ended, facts = found
    entry = entry_for(call.home, call.identity)
    made = entry.made(call) if entry is not None else bool(call.credential)
    return used_line(
        call, entry, facts["decision"], facts["reason"], ended,
        facts["latency_ms"], AUDIT, facts["code"], facts["audit_id"],
        event="used" if made else "checked",
    )  # fmt: skip


def prefer_authorizer(lines: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """With both sources configured each call is seen twice: keep the webhook's lines
    for a task when it has any, the audit events' otherwise."""
    with_webhook = {
        (line.get("task") or {}).get("uid")
        for line in lines
        if line.get("event") == "used" and line.get("source") == AUTHORIZER
    }
    return [
        line
        for line in lines
        if not (
            line.get("event") in ("used", "checked")
            and line.get("source") == AUDIT
            and (line.get("task") or {}).get("uid") in with_webhook
        )
    ]
