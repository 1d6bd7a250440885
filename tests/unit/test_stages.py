"""Staged tasks: parsing and the status record (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from agent_access import stages
from agent_access.engine import SpecError, parse_task_spec

RULES = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]
T0 = datetime(2026, 12, 5, 10, tzinfo=UTC)


def spec(**extra):
    return {
        "agent": "bot",
        "intent": "release",
        "ttl": "1h",
        "stages": [
            {"name": "inspect", "ttl": "10m", "access": [{"rules": RULES}]},
            {"name": "deploy", "ttl": "3h", "access": [{"namespace": "shop", "rules": RULES}]},
            {"name": "verify", "access": [{"preset": "check"}]},
        ],
        **extra,
    }


def test_the_current_stage_is_what_gets_decided():
    first = parse_task_spec("agents", spec())
    assert (first.stage, first.stage_index, first.staged) == ("inspect", 0, True)
    assert first.ttl == timedelta(minutes=10) and first.task_ttl == timedelta(hours=1)
    assert first.target_namespaces == ("agents",)
    deploy = parse_task_spec("agents", spec(stage="deploy"))
    assert deploy.ttl == timedelta(hours=1)  # a stage never outlives the task
    assert deploy.target_namespaces == ("shop",)
    last = parse_task_spec("agents", spec(stage="verify"))
    assert last.last_stage and last.access[0].preset == "check"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"access": [{"rules": RULES}]}, "not both"),
        ({"stage": "nope"}, "not one of"),
        ({"stages": []}, "1 to 16"),
        ({"stages": [{"name": "a", "access": [{"rules": RULES}]}] * 2}, "used twice"),
        ({"stages": [{"name": "a"}]}, "needs at least one entry"),
    ],
)
def test_bad_stages(change, message):
    with pytest.raises(SpecError, match=message):
        parse_task_spec("agents", spec(**change))


def test_the_stage_record():
    names = ("inspect", "deploy", "verify")
    record = ({"name": "inspect", "phase": "Active", "reason": "PolicyAllowed"},)
    left = stages.leave(record, names, 0, 2, T0)
    assert [(e["name"], e["phase"]) for e in left] == [
        ("inspect", "Completed"),
        ("deploy", "Skipped"),
        ("verify", "Pending"),
    ]
    assert stages.started_at(left, "verify") == "2026-12-05T10:00:00.000000Z"
    ended = stages.end(left, "verify", "Denied", "RuleNotAllowed", T0)
    assert ended[-1]["phase"] == "Denied" and ended[-1]["reason"] == "RuleNotAllowed"
    assert stages.sanitize([{"name": "a"}, "junk", {"no": "name"}]) == ({"name": "a"},)
