"""CEL conditions (conditions.py) and their place in the engine, table-driven, with the
clock injected."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from agent_access.conditions import (
    ConditionError,
    compile_condition,
    compile_conditions,
    for_namespace,
    holds,
    namespace_object,
    rewrite,
)
from agent_access.engine import Denied, Granted, World, decide, parse_task_spec, reassess
from agent_access.model import Reason

from .test_engine import policy

RULES = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]
OFFICE = "now.getHours('Europe/Berlin') >= 7 && now.getHours('Europe/Berlin') < 20"
RESTRICTED = (
    "namespace.metadata.labels['data-class'] != 'restricted' || "
    "duration(task.spec.ttl) <= duration('10m')"
)


def at(hour: int) -> datetime:
    return datetime(2026, 12, 7, hour, 30, tzinfo=UTC)  # a Monday; Berlin is UTC+1


@pytest.mark.parametrize(
    ("expression", "labels", "ttl", "hour", "ok"),
    [
        (OFFICE, {}, "5m", 5, False),  # 06:30 in Berlin
        (OFFICE, {}, "5m", 6, True),  # 07:30
        (OFFICE, {}, "5m", 18, True),  # 19:30
        (OFFICE, {}, "5m", 19, False),  # 20:30
        (RESTRICTED, {"data-class": "restricted"}, "5m", 12, True),
        (RESTRICTED, {"data-class": "restricted"}, "1h", 12, False),
        (RESTRICTED, {"data-class": "public"}, "1h", 12, True),
        (RESTRICTED, {}, "1h", 12, False),  # no label: the lookup errs, counts as false
        ("task.spec.intent.startsWith('INC-')", {}, "5m", 12, True),
        ("requester.groups.exists(g, g == 'oncall')", {}, "5m", 12, True),
        ("pod == null", {}, "5m", 12, True),
        ("agent.metadata.name == 'bot'", {}, "5m", 12, True),
        (
            "task.metadata.namespace == 'agents' && namespace.metadata.name == 'payments'",
            {},
            "5m",
            12,
            True,
        ),
    ],
)
def test_conditions_table(expression, labels, ttl, hour, ok):
    p = policy(conditions=[{"expression": expression, "message": "no"}])
    assert p.problem is None, p.problem
    spec = {"agent": "bot", "intent": "INC-1: x", "ttl": ttl, "access": [
        {"namespace": "payments", "rules": RULES}]}  # fmt: skip
    world = World(
        policies=[p],
        namespaces={"payments": labels},
        agent_object={"metadata": {"name": "bot", "namespace": "agents", "labels": {}}},
    )
    requester = {"metadata": {"namespace": "agents", "annotations": {
        "agentaccess.io/requester-username": "alice",
        "agentaccess.io/requester-groups": '["oncall"]'}}}  # fmt: skip
    from agent_access.engine import evaluate, requester_of

    parsed = parse_task_spec("agents", spec, requester_of(requester["metadata"]))
    got = evaluate(parsed, world, at(hour))
    assert isinstance(got, Granted) == ok, got
    if not ok:
        assert isinstance(got, Denied) and got.reason == Reason.CONDITION_FAILED
        assert got.message.endswith(": no") and expression[:20] in got.detail


def test_another_policy_without_conditions_still_covers():
    gated = policy(name="gated", conditions=[{"expression": "false"}])
    plain = policy(name="plain")
    spec = {"agent": "bot", "intent": "x", "access": [{"namespace": "payments", "rules": RULES}]}
    got = decide("agents", spec, World(policies=[gated, plain], namespaces={"payments": {}}), at(9))
    assert isinstance(got, Granted) and got.policy_keys == ["payments/plain"]


def test_reassess_keeps_the_condition_reason():
    p = policy(conditions=[{"expression": "namespace.metadata.labels[?'x'] != optional.of('y')",
                            "message": "not in y"}])  # fmt: skip
    spec = parse_task_spec("agents", {"agent": "bot", "intent": "x", "access": [
        {"namespace": "payments", "rules": RULES}]})  # fmt: skip
    from agent_access.engine import condition_context

    context = condition_context(spec, [p], None, None, at(9))
    assert isinstance(reassess(spec, [p], {"payments": {}}, [p.key], context), object)
    got = reassess(spec, [p], {"payments": {"x": "y"}}, [p.key], context)
    assert isinstance(got, Denied) and got.reason == Reason.CONDITION_FAILED
    assert "not in y" in got.message
    # without a context (nothing to evaluate with) a policy with conditions never applies
    blind = reassess(spec, [p], {"payments": {}}, [p.key], None)
    assert isinstance(blind, Denied)


@pytest.mark.parametrize(
    "bad",
    ["1 +", "'a string'", "undeclared_variable", "namespace.metadata.labels[", "x" * 5000, ""],
)
def test_invalid_conditions(bad):
    with pytest.raises(ConditionError):
        compile_condition(bad)
    p = policy(conditions=[{"expression": bad}])
    assert p.problem is not None and p.problem[0] == "InvalidCondition"


def test_the_reserved_word_namespace_is_the_target_namespace():
    assert rewrite("namespace.a == 'namespace' && t.namespace == r'namespace'") == (
        "namespacE.a == 'namespace' && t.namespace == r'namespace'"
    )
    assert rewrite('"""namespace""" + namespace') == '"""namespace""" + namespacE'
    c = compile_condition("namespace.metadata.name == namespaceObject.metadata.name")
    assert holds([c], for_namespace({}, namespace_object("a", {}))) is None


def test_evaluation_is_bounded():
    c = compile_condition("[1,2,3,4,5,6,7,8,9,10].all(a, [1,2,3,4,5,6,7,8,9,10].all(b, "
                          "[1,2,3,4,5,6,7,8,9,10].all(c, [1,2,3,4,5,6,7,8,9,10].all(d, "
                          "[1,2,3,4,5,6,7,8,9,10].all(e, true)))))")  # fmt: skip
    why = holds([c], for_namespace({}, {}))
    assert why is not None and "could not be evaluated" in why.detail
    assert "[1,2" not in why.message  # the expression is for the audit line only


@pytest.mark.parametrize(
    "amplifier",
    [
        "'a'.replace('a', 'aaaa').replace('a', 'aaaa') != ''",
        "task.spec.intent.split('').join(task.spec.intent) != ''",
        "regex.replace('a', 'a', 'aa') != ''",
        "task.spec.intent.quote() != ''",
    ],
)
def test_functions_that_multiply_a_strings_size_are_refused(amplifier):
    with pytest.raises(ConditionError, match="may not be used"):
        compile_condition(amplifier)


def test_too_many_conditions():
    with pytest.raises(ConditionError):
        compile_conditions([{"expression": "true"}] * 17)
