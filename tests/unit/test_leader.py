"""Lease decisions (pure) and the install-level namespace guardrail."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from agent_access.engine import Denied, World, decide, parse_policy
from agent_access.leader import decide as lease
from agent_access.model import Reason
from agent_access.rules import DEFAULT_GUARDRAILS

NOW = datetime(2026, 11, 28, 16, 0, tzinfo=UTC)


def ts(delta_s: float) -> str:
    return (NOW + timedelta(seconds=delta_s)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_free_lease_is_taken():
    assert lease({}, "me", NOW).take
    assert lease({"holderIdentity": ""}, "me", NOW).take


def test_own_lease_is_renewed_and_transitions_kept():
    v = lease({"holderIdentity": "me", "renewTime": ts(-1), "leaseTransitions": 3}, "me", NOW)
    assert v.take and v.transitions == 3


def test_live_lease_of_another_is_respected():
    v = lease(
        {"holderIdentity": "other", "renewTime": ts(-5), "leaseDurationSeconds": 15}, "me", NOW
    )
    assert not v.take


def test_expired_lease_of_another_is_taken_over():
    v = lease(
        {
            "holderIdentity": "other",
            "renewTime": ts(-16),
            "leaseDurationSeconds": 15,
            "leaseTransitions": 1,
        },
        "me",
        NOW,
    )
    assert v.take and v.transitions == 2


def test_grant_namespaces_guardrail():
    policy = parse_policy(
        {
            "kind": "AccessPolicy",
            "metadata": {"name": "p", "namespace": "shop"},
            "spec": {
                "subjects": [{"namespace": "agents", "serviceAccount": "bot"}],
                "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}],
            },
        }
    )
    spec = {
        "agent": "bot",
        "intent": "x",
        "access": [
            {
                "namespace": "shop",
                "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}],
            }
        ],
    }
    world = World(policies=[policy], namespaces={"shop": {}})
    limited = DEFAULT_GUARDRAILS.extended(target_namespaces=["payments"])
    d = decide("agents", spec, world, NOW, limited)
    assert isinstance(d, Denied) and d.reason == Reason.FORBIDDEN
    assert "payments" in d.message and "shop" in d.message
    assert not isinstance(
        decide("agents", spec, world, NOW, DEFAULT_GUARDRAILS.extended(target_namespaces=["shop"])),
        Denied,
    )
