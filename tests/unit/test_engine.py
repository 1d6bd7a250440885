"""The policy engine, table-driven: every denial reason, coverage and TTL maths."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from agent_access.engine import (
    Denied,
    Granted,
    PodFacts,
    World,
    decide,
    parse_policy,
    reassess,
    selector_matches,
)
from agent_access.model import Reason

NOW = datetime(2026, 11, 28, 16, 0, 0, 500000, tzinfo=UTC)
READ = {"apiGroups": [""], "resources": ["pods", "pods/log"], "verbs": ["get", "list"]}


def policy(ns="payments", name="triage-read", rules=None, subjects=(("agents", "bot"),), **spec):
    return parse_policy(
        {
            "kind": "AccessPolicy",
            "metadata": {"name": name, "namespace": ns, "resourceVersion": "7"},
            "spec": {
                "subjects": [{"namespace": n, "serviceAccount": s} for n, s in subjects],
                "rules": rules
                or [
                    {
                        "apiGroups": [""],
                        "resources": ["pods", "pods/log"],
                        "verbs": ["get", "list", "watch"],
                    }
                ],
                **spec,
            },
        }
    )


def cluster_policy(selector, name="platform", rules=None, **spec):
    return parse_policy(
        {
            "kind": "ClusterAccessPolicy",
            "metadata": {"name": name},
            "spec": {
                "subjects": [{"namespace": "agents", "serviceAccount": "bot"}],
                "rules": rules or [READ],
                "namespaceSelector": selector,
                **spec,
            },
        }
    )


def world(*policies, namespaces=None, agent=True, pod=None):
    return World(
        policies=policies,
        namespaces=namespaces or {"payments": {}, "agents": {}, "shop": {"team": "a"}},
        agent_exists=agent,
        pod=pod,
    )


def spec(rules=None, ns="payments", **extra):
    return {
        "agent": "bot",
        "intent": "read logs",
        "ttl": "10m",
        "access": [{"namespace": ns, "rules": rules or [READ]}],
        **extra,
    }


def test_grant_within_policy():
    d = decide("agents", spec(), world(policy()), NOW)
    assert isinstance(d, Granted)
    assert d.policy_keys == ["payments/triage-read"]
    assert d.granted_at == datetime(2026, 11, 28, 16, 0, 0, tzinfo=UTC)
    assert d.expires_at - d.granted_at == timedelta(minutes=10)
    assert "granted 1 rule in payments until 2026-11-28T16:10:00Z" in d.summary()


def test_default_ttl_is_15m_and_clamped_by_max_ttl():
    raw = spec()
    del raw["ttl"]
    assert decide("agents", raw, world(policy()), NOW).ttl == timedelta(minutes=15)
    d = decide("agents", spec(ttl="2h"), world(policy(maxTTL="30m")), NOW)
    assert d.ttl == timedelta(minutes=30)
    d = decide("agents", spec(ttl="2h"), world(policy()), NOW)
    assert d.ttl == timedelta(hours=1)  # the default maxTTL


@pytest.mark.parametrize(
    "raw,reason,words",
    [
        (
            spec(rules=[{"apiGroups": [""], "resources": ["pods"], "verbs": ["delete"]}]),
            Reason.RULE_NOT_ALLOWED,
            ["payments", "delete pods"],
        ),
        (spec(ns="shop"), Reason.NO_MATCHING_POLICY, ["shop", "pods"]),
        # no oracle: a namespace that does not exist reads like one no policy governs
        (spec(ns="nowhere"), Reason.NO_MATCHING_POLICY, ["nowhere", "no AccessPolicy"]),
        (
            spec(rules=[{"apiGroups": [""], "resources": ["pods"], "verbs": ["*"]}]),
            Reason.FORBIDDEN,
            ["wildcard", "verbs"],
        ),
        (
            spec(
                rules=[
                    {"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["impersonate"]}
                ]
            ),
            Reason.FORBIDDEN,
            ["impersonate"],
        ),
        (
            spec(
                rules=[
                    {
                        "apiGroups": ["certificates.k8s.io"],
                        "resources": ["certificatesigningrequests/approval"],
                        "verbs": ["update"],
                    }
                ]
            ),
            Reason.FORBIDDEN,
            ["certificatesigningrequests"],
        ),
        (
            spec(rules=[{"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["patch"]}]),
            Reason.FORBIDDEN,
            ["patch", "serviceaccounts"],
        ),
        ({**spec(), "intent": ""}, Reason.INVALID_SPEC, ["intent"]),
        ({**spec(), "ttl": "forever"}, Reason.INVALID_SPEC, ["ttl"]),
        ({**spec(), "access": []}, Reason.INVALID_SPEC, ["access"]),
        ({**spec(), "agent": ""}, Reason.INVALID_SPEC, ["agent"]),
        (
            spec(rules=[{"apiGroups": [""], "resources": [], "verbs": ["get"]}]),
            Reason.INVALID_SPEC,
            ["resources"],
        ),
    ],
)
def test_denials(raw, reason, words):
    wide = policy(rules=[{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}])
    d = decide("agents", raw, world(wide if reason == Reason.FORBIDDEN else policy()), NOW)
    assert isinstance(d, Denied), d
    assert d.reason == reason
    for w in words:
        assert w in d.message


def test_agent_and_pod_checks():
    assert (
        decide("agents", spec(), world(policy(), agent=False), NOW).reason == Reason.AGENT_NOT_FOUND
    )
    assert decide("agents", spec(podName="p"), world(policy()), NOW).reason == Reason.POD_NOT_FOUND
    other = PodFacts("p", "u", "someone", "Running", False)
    assert (
        decide("agents", spec(podName="p"), world(policy(), pod=other), NOW).reason
        == Reason.INVALID_SPEC
    )
    gone = PodFacts("p", "u", "bot", "Running", True)
    assert (
        decide("agents", spec(podName="p"), world(policy(), pod=gone), NOW).reason
        == Reason.POD_NOT_FOUND
    )
    done = PodFacts("p", "u", "bot", "Succeeded", False)
    assert (
        decide("agents", spec(podName="p"), world(policy(), pod=done), NOW).reason
        == Reason.INVALID_SPEC
    )
    ok = PodFacts("p", "u", "bot", "Running", False)
    assert isinstance(decide("agents", spec(podName="p"), world(policy(), pod=ok), NOW), Granted)


def test_guardrails_hold_over_a_wildcard_policy_and_come_first():
    wide = policy(rules=[{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}])
    esc = {
        "apiGroups": ["rbac.authorization.k8s.io"],
        "resources": ["roles"],
        "verbs": ["escalate"],
    }
    d = decide("agents", spec(rules=[esc]), world(wide, agent=False), NOW)
    assert d.reason == Reason.FORBIDDEN


def test_union_of_policies_covers_and_used_policies_clamp():
    a = policy(
        name="a", rules=[{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}], maxTTL="20m"
    )
    b = policy(
        name="b", rules=[{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}], maxTTL="5m"
    )
    unused = policy(
        name="c",
        rules=[{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}],
        maxTTL="1m",
    )
    rule = {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}
    d = decide("agents", spec(rules=[rule], ttl="1h"), world(a, b, unused), NOW)
    assert isinstance(d, Granted)
    assert d.policy_keys == ["payments/a", "payments/b"]
    assert d.ttl == timedelta(minutes=5)


def test_resource_names():
    named = policy(
        rules=[
            {
                "apiGroups": [""],
                "resources": ["configmaps"],
                "verbs": ["get"],
                "resourceNames": ["cfg"],
            }
        ]
    )
    unnarrowed = {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}
    narrowed = {**unnarrowed, "resourceNames": ["cfg"]}
    other = {**unnarrowed, "resourceNames": ["cfg", "secret-cfg"]}
    assert (
        decide("agents", spec(rules=[unnarrowed]), world(named), NOW).reason
        == Reason.RULE_NOT_ALLOWED
    )
    assert isinstance(decide("agents", spec(rules=[narrowed]), world(named), NOW), Granted)
    d = decide("agents", spec(rules=[other]), world(named), NOW)
    assert d.reason == Reason.RULE_NOT_ALLOWED and "secret-cfg" in d.message


def test_require_pod():
    p = policy(requirePod=True)
    d = decide("agents", spec(), world(p), NOW)
    assert d.reason == Reason.NO_MATCHING_POLICY and "podName" in d.message
    pod = PodFacts("p", "u", "bot", "Running", False)
    assert isinstance(decide("agents", spec(podName="p"), world(p, pod=pod), NOW), Granted)


def test_cluster_policy_selector():
    cap = cluster_policy({"matchLabels": {"team": "a"}})
    assert isinstance(decide("agents", spec(ns="shop"), world(cap), NOW), Granted)
    assert (
        decide("agents", spec(ns="payments"), world(cap), NOW).reason == Reason.NO_MATCHING_POLICY
    )
    empty = cluster_policy({})
    assert decide("agents", spec(ns="shop"), world(empty), NOW).reason == Reason.NO_MATCHING_POLICY


def test_subject_must_match_namespace_and_name():
    p = policy(subjects=(("elsewhere", "bot"), ("agents", "other")))
    assert decide("agents", spec(), world(p), NOW).reason == Reason.NO_MATCHING_POLICY


def test_access_namespace_defaults_to_task_namespace():
    raw = {"agent": "bot", "intent": "x", "access": [{"rules": [READ]}]}
    d = decide("agents", raw, world(policy(ns="agents")), NOW)
    assert isinstance(d, Granted) and d.grants[0].namespace == "agents"


@pytest.mark.parametrize(
    "selector,labels,expected",
    [
        ({"matchLabels": {"a": "1"}}, {"a": "1"}, True),
        ({"matchLabels": {"a": "1"}}, {"a": "2"}, False),
        (
            {"matchExpressions": [{"key": "a", "operator": "In", "values": ["1", "2"]}]},
            {"a": "2"},
            True,
        ),
        ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {}, True),
        ({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {}, False),
        ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, {}, True),
        ({}, {"a": "1"}, False),
    ],
)
def test_selector(selector, labels, expected):
    assert selector_matches(selector, labels) is expected


def test_reevaluate_reasons():
    from agent_access.engine import parse_task_spec

    s = parse_task_spec("agents", spec())
    ns = {"payments": {}}
    assert not isinstance(reassess(s, [policy()], ns, ["payments/triage-read"]), Denied)
    narrowed = policy(rules=[{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}])
    assert reassess(s, [narrowed], ns, ["payments/triage-read"]).reason == Reason.POLICY_CHANGED
    assert reassess(s, [], ns, ["payments/triage-read"]).reason == Reason.POLICY_DELETED
    # a deleted policy whose rules another policy still covers: nothing to revoke
    assert not isinstance(
        reassess(s, [policy(name="backup")], ns, ["payments/triage-read"]), Denied
    )


def test_dry_run_is_a_boolean_of_the_spec():
    from agent_access.engine import SpecError, parse_task_spec

    base = {"agent": "bot", "intent": "x", "access": [{"rules": [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]}]}  # fmt: skip
    assert parse_task_spec("ns", base).dry_run is False
    assert parse_task_spec("ns", {**base, "dryRun": True}).dry_run is True
    with pytest.raises(SpecError, match="dryRun"):
        parse_task_spec("ns", {**base, "dryRun": "yes"})


def test_a_suspended_agent_is_denied_before_anything_else_is_looked_at():
    from datetime import UTC, datetime

    from agent_access.engine import Denied, World, evaluate, parse_task_spec
    from agent_access.facts import AgentFacts, suspension

    spec = parse_task_spec("agents", {"agent": "bot", "intent": "x", "access": [{"rules": [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]}]})  # fmt: skip
    why = suspension("agents", "bot", AgentFacts("u", True), {})
    assert why and "agents/bot is suspended" in why
    assert "namespace agents" in suspension("agents", "bot", AgentFacts("u", False),
                                            {"agentaccess.io/suspended": "true"})  # fmt: skip
    assert suspension("agents", "bot", AgentFacts("u", False), {"x": "true"}) is None
    assert suspension("agents", "bot", None, {"agentaccess.io/suspended": "false"}) is None
    decision = evaluate(spec, World(suspended=why), datetime.now(UTC))
    assert isinstance(decision, Denied) and decision.reason == "AgentSuspended"
