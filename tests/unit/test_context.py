"""Presets, intent patterns and limits in the engine (pure; no cluster)."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

import pytest

from agent_access.engine import (
    Denied,
    Granted,
    World,
    check_limits,
    decide,
    parse_task_spec,
    reassess,
)
from agent_access.model import Reason
from agent_access.patterns import intent_matches, pattern_problem

from .test_engine import policy

NOW = datetime(2026, 12, 5, 10, 0, tzinfo=UTC)
LOGS = [{"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]}]
NS = {"payments": {}}


def task(access, intent="INC-1: read the logs of the failing pod"):
    return {"agent": "bot", "intent": intent, "access": access}


def test_a_preset_resolves_to_the_defining_policys_rules():
    p = policy(presets={"read-logs": LOGS})
    got = decide("agents", task([{"namespace": "payments", "preset": "read-logs"}]),
                 World(policies=[p], namespaces=NS), NOW)  # fmt: skip
    assert isinstance(got, Granted)
    assert [r.to_dict() for r in got.grants[0].rules] == LOGS
    assert got.spec is not None and got.spec.access[0].preset == "read-logs"


def test_an_unknown_preset_or_one_of_a_policy_that_does_not_apply_is_refused():
    other = policy(subjects=(("agents", "someone-else"),), presets={"read-logs": LOGS})
    for policies in ([policy()], [other]):
        got = decide("agents", task([{"namespace": "payments", "preset": "read-logs"}]),
                     World(policies=policies, namespaces=NS), NOW)  # fmt: skip
        assert isinstance(got, Denied) and got.reason == Reason.NO_MATCHING_POLICY


def test_a_preset_is_still_held_to_the_guardrails():
    wild = [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["escalate"]}]
    got = decide("agents", task([{"namespace": "payments", "preset": "bad"}]),
                 World(policies=[policy(presets={"bad": wild})], namespaces=NS), NOW)  # fmt: skip
    assert isinstance(got, Denied) and got.reason == Reason.FORBIDDEN


def test_rules_and_preset_are_exclusive():
    with pytest.raises(ValueError, match="not both"):
        parse_task_spec("agents", task([{"preset": "x", "rules": LOGS}]))


def test_reassess_fails_closed_when_a_preset_grant_is_not_known():
    spec = parse_task_spec("agents", task([{"namespace": "payments", "preset": "read-logs"}]))
    got = reassess(spec, [policy(presets={"read-logs": LOGS})], NS, ["payments/triage-read"])
    assert isinstance(got, Denied) and got.reason == Reason.POLICY_CHANGED


@pytest.mark.parametrize(
    ("intent", "ok"),
    [("INC-1: read the logs of the failing pod", True), ("CHG-22: roll it", False),
     ("please read logs", False), ("x INC-1: read the logs of the failing pod", False)],
)  # fmt: skip
def test_intent_pattern(intent, ok):
    p = policy(intent={"pattern": "^(INC|CHG)-[0-9]+: .{10,}"})
    rules = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]
    got = decide("agents", task([{"namespace": "payments", "rules": rules}], intent),
                 World(policies=[p], namespaces=NS), NOW)  # fmt: skip
    assert isinstance(got, Granted) == ok
    if not ok:
        assert isinstance(got, Denied) and got.reason == Reason.INTENT_REJECTED


def test_a_bad_pattern_makes_the_policy_match_nothing():
    p = policy(intent={"pattern": "(a"})
    assert p.problem is not None and p.problem[0] == "InvalidIntentPattern"
    rules = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]
    got = decide("agents", task([{"namespace": "payments", "rules": rules}], "(a"),
                 World(policies=[p], namespaces=NS), NOW)  # fmt: skip
    assert isinstance(got, Denied) and got.reason == Reason.NO_MATCHING_POLICY


def test_re2_has_no_backreferences_and_runs_in_linear_time():
    assert pattern_problem(r"(a)\1") is not None
    assert not intent_matches("(a+)+$", "a" * 5000 + "b")  # no catastrophic backtracking


def test_limits():
    p = policy(maxActiveTasks=2)
    spec = parse_task_spec("agents", task([{"namespace": "payments", "rules": LOGS}]))
    assert check_limits(spec, [p], Counter({p.key: 1})) is None
    got = check_limits(spec, [p], Counter({p.key: 2}))
    assert got is not None and got.reason == Reason.LIMIT_EXCEEDED


def test_a_task_being_issued_counts_once():
    """Registered before its reservation is released: still one task, not two."""
    from agent_access.limits import Limits
    from agent_access.runtime import LiveGrant, Registry

    registry = Registry()
    limits = Limits(registry)
    p = policy(maxActiveTasks=2)
    spec = parse_task_spec("agents", task([{"namespace": "payments", "rules": LOGS}]))
    assert limits.reserve("a", spec, [p]) is None
    registry.add(LiveGrant("agents", "a", "a", spec, "sa", "s", (), (p.key,), None))
    assert limits.reserve("b", spec, [p]) is None  # a (registered and reserved) + b = 2
    assert limits.reserve("c", spec, [p]) is not None
