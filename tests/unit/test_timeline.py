"""Rebuilding a task's path from status, Events and audit lines (pure)."""

from __future__ import annotations

from agent_access.audit import render_text, timeline

TASK = {
    "metadata": {
        "name": "t",
        "namespace": "agents",
        "uid": "u1",
        "creationTimestamp": "2026-11-28T16:00:00Z",
    },
    "spec": {
        "agent": "bot",
        "intent": "read logs",
        "ttl": "10m",
        "access": [
            {
                "namespace": "payments",
                "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}],
            }
        ],
    },
    "status": {
        "phase": "Expired",
        "reason": "TTLExpired",
        "message": "the TTL ran out",
        "grantedAt": "2026-11-28T16:00:00Z",
        "expiresAt": "2026-11-28T16:10:00Z",
        "endedAt": "2026-11-28T16:10:00Z",
        "policies": ["payments/read"],
    },
}
EVENTS = [
    {
        "reason": "PolicyAllowed",
        "type": "Normal",
        "message": "granted",
        "lastTimestamp": "2026-11-28T16:00:00Z",
    },
    {
        "reason": "TTLExpired",
        "type": "Normal",
        "message": "the TTL ran out",
        "lastTimestamp": "2026-11-28T16:10:00Z",
    },
]
LINES = [
    {
        "time": "2026-11-28T16:00:00.250000Z",
        "event": "granted",
        "reason": "PolicyAllowed",
        "message": "granted",
        "task": {"name": "t", "namespace": "agents", "uid": "u1"},
        "agent": "bot",
        "intent": "read logs",
        "phase": "Active",
    },
    {
        "time": "2026-11-28T16:10:00.010000Z",
        "event": "expired",
        "reason": "TTLExpired",
        "message": "the TTL ran out",
        "task": {"name": "t", "namespace": "agents", "uid": "u1"},
        "agent": "bot",
        "intent": "read logs",
        "phase": "Expired",
    },
]


def test_merged_in_time_order():
    path = timeline(TASK, EVENTS, LINES)
    assert [(e["source"], e["event"]) for e in path["timeline"]] == [
        ("status", "requested"),
        ("status", "granted"),
        ("event", "granted"),
        ("audit", "granted"),
        ("status", "expired"),
        ("event", "expired"),
        ("audit", "expired"),
    ]
    assert path["task"]["phase"] == "Expired"
    assert "get pods in payments" in path["timeline"][0]["message"]


def test_audit_lines_alone_rebuild_a_deleted_task():
    path = timeline(None, (), LINES)
    assert path["task"] == {
        "name": "t",
        "namespace": "agents",
        "uid": "u1",
        "agent": "bot",
        "intent": "read logs",
        "podName": None,
        "phase": "Expired",
        "reason": "TTLExpired",
    }
    assert [e["event"] for e in path["timeline"]] == ["granted", "expired"]


def test_denial_events_read_as_denied():
    events = [
        {
            "reason": "RuleNotAllowed",
            "type": "Warning",
            "message": "no",
            "lastTimestamp": "2026-11-28T16:00:01Z",
        }
    ]
    assert timeline(None, events, ())["timeline"][0]["event"] == "denied"


def test_text_rendering():
    text = render_text([timeline(TASK, EVENTS, LINES)])
    assert text.startswith("AgentTask agents/t  (uid u1)")
    assert "TTLExpired" in text and "requested" in text
