"""Hardening in the pure core: guardrails cover every way out, an agent asks only for
itself, audiences are governed, bad data stays local, messages reveal nothing."""

from __future__ import annotations

import pytest

from agent_access.durations import DurationError, parse_duration
from agent_access.engine import (
    Denied,
    Granted,
    Requester,
    SpecError,
    decide,
    evaluate,
    parse_policy,
    parse_task_spec,
    requester_of,
)
from agent_access.facts import parse_policies
from agent_access.model import MAX_REQUEST_ATOMS, Reason
from agent_access.rules import DEFAULT_GUARDRAILS

from .test_engine import NOW, policy, spec, world

WIDE = [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]


@pytest.mark.parametrize(
    "group,resource,verb",
    [
        ("", "users", "impersonate:user-info"),
        ("", "serviceaccounts", "impersonate:serviceaccount"),
        ("", "nodes", "impersonate:arbitrary-node"),
        ("", "pods", "impersonate-on:user-info:list"),
        ("agentaccess.io", "agenttasks", "create"),
        ("agentaccess.io", "agenttasks/status", "patch"),
        ("agentaccess.io", "accesspolicies", "create"),
        ("agentaccess.io", "clusteraccesspolicies", "update"),
        ("agentaccess.io", "agenttaskapprovals", "create"),
        ("", "namespaces", "patch"),
        ("", "namespaces", "update"),
        ("", "pods/ephemeralcontainers", "patch"),
        ("", "pods/ephemeralcontainers", "get"),
    ],
)
def test_guardrails_cover_every_way_out(group, resource, verb):
    rule = {"apiGroups": [group], "resources": [resource], "verbs": [verb]}
    d = decide("agents", spec(rules=[rule]), world(policy(rules=WIDE)), NOW)
    assert isinstance(d, Denied) and d.reason == Reason.FORBIDDEN, d
    assert resource in d.message or verb in d.message


def test_reading_the_operators_api_and_namespaces_stays_possible():
    rules = [
        {"apiGroups": ["agentaccess.io"], "resources": ["agenttasks"], "verbs": ["get", "list"]},
        {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get"]},
    ]
    assert isinstance(decide("agents", spec(rules=rules), world(policy(rules=WIDE)), NOW), Granted)


def test_nothing_is_granted_in_the_operators_own_namespace():
    rails = DEFAULT_GUARDRAILS.extended(protected_namespaces=["payments"])
    d = decide("agents", spec(), world(policy()), NOW, rails)
    assert isinstance(d, Denied) and d.reason == Reason.FORBIDDEN
    assert "does not grant into this namespace" in d.message


def test_watched_namespaces_narrow_grant_namespaces():
    rails = DEFAULT_GUARDRAILS.extended(target_namespaces=["payments", "shop"])
    rails = rails.extended(target_namespaces=["shop", "agents"])
    assert rails.target_namespaces == frozenset({"shop"})


def _as(username, groups=()):
    return Requester(username=username, uid="u-1", groups=tuple(groups))


def _evaluate(raw, requester, *policies):
    parsed = parse_task_spec("agents", raw, requester)
    return evaluate(parsed, world(*policies), NOW)


def test_an_agent_asks_for_itself():
    me = _as("system:serviceaccount:agents:bot")
    assert isinstance(_evaluate(spec(), me, policy()), Granted)
    other = _as("system:serviceaccount:agents:mallory")
    d = _evaluate(spec(), other, policy())
    assert isinstance(d, Denied) and d.reason == Reason.REQUESTER_NOT_ALLOWED
    assert "mallory" in d.message and "triage-read" not in d.message


def test_a_listed_service_account_may_ask_for_another_agent():
    other = _as("system:serviceaccount:agents:planner")
    listed = policy(
        requesters=[{"kind": "ServiceAccount", "namespace": "agents", "name": "planner"}]
    )
    assert isinstance(_evaluate(spec(), other, listed), Granted)


def test_people_and_other_namespaces_ask_on_behalf_of_agents():
    assert isinstance(_evaluate(spec(), _as("alice@example.com"), policy()), Granted)
    assert isinstance(
        _evaluate(spec(), _as("system:serviceaccount:ci:deployer"), policy()), Granted
    )


@pytest.mark.parametrize(
    "entry,requester,allowed",
    [
        ({"kind": "User", "name": "alice"}, _as("alice"), True),
        ({"kind": "User", "name": "alice"}, _as("bob"), False),
        ({"kind": "Group", "name": "oncall"}, _as("bob", ["oncall"]), True),
        ({"kind": "Group", "name": "oncall"}, _as("bob", ["dev"]), False),
        ({"kind": "User", "name": "alice"}, None, False),
    ],
)
def test_policy_requesters(entry, requester, allowed):
    d = _evaluate(spec(), requester, policy(requesters=[entry]))
    assert isinstance(d, Granted) == allowed
    if not allowed:
        assert d.reason == Reason.REQUESTER_NOT_ALLOWED


def test_requester_comes_only_from_the_stamped_annotations():
    meta = {
        "annotations": {
            "agentaccess.io/requester-username": "alice",
            "agentaccess.io/requester-uid": "42",
            "agentaccess.io/requester-groups": '["devs","system:authenticated"]',
        }
    }
    r = requester_of(meta)
    assert r == Requester("alice", "42", ("devs", "system:authenticated"))
    assert requester_of({}) is None
    assert requester_of({"annotations": ["not", "a", "map"]}) is None
    meta["annotations"]["agentaccess.io/requester-groups"] = "devs\nops"
    assert requester_of(meta).groups == ()  # not the admission policy's form: no groups


def test_audiences_need_every_covering_policy():
    raw = spec(audiences=["vault"])
    d = decide("agents", raw, world(policy()), NOW)
    assert isinstance(d, Denied) and d.reason == Reason.AUDIENCE_NOT_ALLOWED
    assert isinstance(
        decide("agents", raw, world(policy(allowedAudiences=["vault"])), NOW), Granted
    )
    logs = {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]}
    two = world(
        policy(rules=[READ_PODS], allowedAudiences=["vault"]),
        policy(name="logs", rules=[logs]),
    )
    d = decide("agents", spec(rules=[READ_PODS, logs], audiences=["vault"]), two, NOW)
    assert isinstance(d, Denied) and d.reason == Reason.AUDIENCE_NOT_ALLOWED


READ_PODS = {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}


def test_a_huge_request_is_refused_at_bounded_cost():
    names = [f"p{i}" for i in range(1000)]
    rule = {
        "apiGroups": [""],
        "resources": ["pods", "configmaps", "services"],
        "verbs": ["get", "list", "watch", "patch", "update", "delete", "create"],
        "resourceNames": names,
    }
    d = decide("agents", spec(rules=[rule]), world(policy(rules=WIDE)), NOW)
    assert isinstance(d, Denied) and d.reason == Reason.INVALID_SPEC
    assert str(MAX_REQUEST_ATOMS) in d.message


@pytest.mark.parametrize("text", ["99999999999999999999h", "9" * 400 + "s", "8785h", "1e9h"])
def test_durations_are_bounded(text):
    with pytest.raises(DurationError):
        parse_duration(text)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s.update(maxTTL="99999999999999999999h"),
        lambda s: s.update(rules="not a list"),
        lambda s: s.update(rules=[{"apiGroups": "", "resources": ["pods"], "verbs": ["get"]}]),
        lambda s: s.update(subjects=[["agents", "bot"]]),
        lambda s: s.update(requesters=[{"kind": "User"}]),
        lambda s: s.update(allowedAudiences="vault"),
    ],
)
def test_one_hostile_policy_spoils_only_itself(mutate):
    bad = {
        "kind": "AccessPolicy",
        "metadata": {"name": "bad", "namespace": "payments"},
        "spec": {"subjects": [{"namespace": "agents", "serviceAccount": "bot"}], "rules": WIDE},
    }
    mutate(bad["spec"])
    with pytest.raises(SpecError):
        parse_policy(bad)
    good = {
        "metadata": {"name": "good", "namespace": "payments"},
        "spec": {
            "subjects": [{"namespace": "agents", "serviceAccount": "bot"}],
            "rules": [READ_PODS],
        },
    }
    parsed = parse_policies([bad, good], [])
    assert [p.name for p in parsed if p.problem is None] == ["good"]
    (broken,) = [p for p in parsed if p.problem is not None]  # matches nothing, says why
    assert broken.name == "bad" and broken.problem[0] == "InvalidSpec" and not broken.subjects


@pytest.mark.parametrize(
    "raw",
    [
        {**spec(), "ttl": "99999999999999999999h"},
        {**spec(), "access": "payments"},
        {**spec(), "access": [{"namespace": 7, "rules": [READ_PODS]}]},
        {**spec(), "audiences": "vault"},
        {**spec(), "podName": ["x"]},
        spec(rules=[{"apiGroups": [""], "resources": "pods", "verbs": ["get"]}]),
    ],
)
def test_a_hostile_task_is_invalid_not_a_crash(raw):
    d = decide("agents", raw, world(policy()), NOW)
    assert isinstance(d, Denied) and d.reason == Reason.INVALID_SPEC


def test_denials_reveal_no_policy_names():
    narrow = policy(name="secret-policy-name")
    d = decide(
        "agents",
        spec(rules=[{"apiGroups": [""], "resources": ["pods"], "verbs": ["delete"]}]),
        world(narrow),
        NOW,
    )
    assert isinstance(d, Denied) and d.reason == Reason.RULE_NOT_ALLOWED
    assert "secret-policy-name" not in d.message and "secret-policy-name" in d.detail


def test_metrics_listen_on_loopback_unless_told():
    from agent_access.cli import build_parser

    assert build_parser().parse_args(["run"]).metrics_host == "127.0.0.1"


def test_a_group_entry_does_not_let_agents_ask_for_each_other():
    """`requesters: [Group system:serviceaccounts:agents]` means "only agents may ask",
    not "any agent may ask as any other"."""
    mallory = _as("system:serviceaccount:agents:mallory", ["system:serviceaccounts:agents"])
    grouped = policy(requesters=[{"kind": "Group", "name": "system:serviceaccounts:agents"}])
    d = _evaluate(spec(), mallory, grouped)
    assert isinstance(d, Denied) and d.reason == Reason.REQUESTER_NOT_ALLOWED
    bot = _as("system:serviceaccount:agents:bot", ["system:serviceaccounts:agents"])
    assert isinstance(_evaluate(spec(), bot, grouped), Granted)


def test_protected_namespaces_are_never_granted_into():
    w = world(policy(), namespaces={"payments": {"agentaccess.io/protected": "true"}})
    d = decide("agents", spec(), w, NOW)
    assert isinstance(d, Denied) and d.reason == Reason.NO_MATCHING_POLICY
    assert "protected" not in d.message and "protected" in d.detail


def test_a_costly_decision_is_refused_before_it_is_made():
    many = [
        policy(name=f"p{i}", rules=[{"apiGroups": ["x"], "resources": ["y"], "verbs": ["z"]}] * 256)
        for i in range(10)
    ]
    rule = {
        "apiGroups": [""],
        "resources": [f"r{i}" for i in range(32)],
        "verbs": ["get"],
        "resourceNames": [f"n{i}" for i in range(100)],
    }
    import time

    started = time.monotonic()
    d = decide("agents", spec(rules=[rule]), world(*many), NOW)
    assert time.monotonic() - started < 0.5
    assert isinstance(d, Denied) and d.reason == Reason.INVALID_SPEC
    assert "too large" in d.message


def test_lower_max_ttl_gives_a_shorter_ceiling():
    from datetime import timedelta

    from agent_access.engine import parse_task_spec as parse
    from agent_access.engine import reassess

    task = parse("agents", spec(ttl="2h"))
    namespaces = {"payments": {}}
    assert reassess(task, [policy(maxTTL="1h")], namespaces, []) == timedelta(hours=1)
    assert reassess(task, [policy(maxTTL="10m")], namespaces, []) == timedelta(minutes=10)
    gone = reassess(task, [], namespaces, ["payments/triage-read"])
    assert isinstance(gone, Denied) and gone.reason == Reason.POLICY_DELETED


def test_events_count_only_when_an_audit_line_confirms_them():
    from agent_access.audit import render_text, timeline

    line = {
        "time": "2026-11-28T16:00:00.400000Z",
        "event": "granted",
        "reason": "PolicyAllowed",
        "message": "granted 1 rule in payments",
        "task": {"name": "t", "namespace": "agents", "uid": "u"},
    }
    real = {
        "reason": "PolicyAllowed",
        "message": "granted 1 rule in payments (requester a)",
        "lastTimestamp": "2026-11-28T16:00:01Z",
    }
    forged = {
        "reason": "PolicyAllowed",
        "message": "granted everything",
        "lastTimestamp": "2026-11-28T16:00:01Z",
    }
    late = {**real, "lastTimestamp": "2026-11-28T16:00:30Z"}
    path = timeline(None, [real, forged, late], [line])
    events = [e for e in path["timeline"] if e["source"] == "event"]
    assert [e["verified"] for e in events] == [True, False, False]
    text = render_text([{**path, "task": {**path["task"], "intent": "x\x1b[2Jy\u202e"}}])
    assert "\x1b" not in text and "\u202e" not in text and "\\x1b" in text
