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
    assert lease({}, "me", 0, 15).take
    assert lease({"holderIdentity": ""}, "me", 0, 15).take


def test_own_lease_is_renewed_and_transitions_kept():
    v = lease({"holderIdentity": "me", "renewTime": ts(-1), "leaseTransitions": 3}, "me", 0, 15)
    assert v.take and v.transitions == 3


def test_live_lease_of_another_is_respected():
    """Live = its record changed less than a lease ago, on our own clock."""
    v = lease(
        {"holderIdentity": "other", "renewTime": ts(-50), "leaseDurationSeconds": 15}, "me", 5, 15
    )
    assert not v.take


def test_expired_lease_of_another_is_taken_over():
    spec = {"holderIdentity": "other", "renewTime": ts(-16), "leaseTransitions": 1}
    v = lease(spec, "me", 16, 15)
    assert v.take and v.transitions == 2


def test_a_renew_time_in_the_future_is_not_trusted():
    """An edited Lease (renewTime a year ahead, a huge leaseDurationSeconds) freezes the
    standbys for one lease of their own, not until that time."""
    spec = {
        "holderIdentity": "attacker",
        "renewTime": ts(365 * 86400),
        "leaseDurationSeconds": 10**9,
        "leaseTransitions": "garbage",
    }
    assert not lease(spec, "me", 14.9, 15).take
    v = lease(spec, "me", 15.1, 15)
    assert v.take and v.transitions == 1


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
    # names the namespace asked for, not the ones the install allows (no oracle)
    assert "payments" not in d.message and "shop" in d.message
    assert not isinstance(
        decide("agents", spec, world, NOW, DEFAULT_GUARDRAILS.extended(target_namespaces=["shop"])),
        Denied,
    )
