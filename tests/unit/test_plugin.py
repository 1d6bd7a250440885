"""kubectl agentaccess: the pure parts (rule syntax, the task it builds, columns)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from agent_access import plugin


def test_rules_group_by_namespace_with_core_as_the_default_group():
    args = plugin.parser().parse_args(
        ["request", "t", "--agent", "bot", "--intent", "why", "--ttl", "5m", "--pod", "p",
         "--rule", "shop:get,list:pods,pods/log", "--rule", "shop:get:deployments:apps",
         "--rule", "pay:list:configmaps"]
    )  # fmt: skip
    body = plugin.task_body(args)
    assert body["metadata"] == {"name": "t"}
    assert body["spec"] == {
        "agent": "bot",
        "intent": "why",
        "ttl": "5m",
        "podName": "p",
        "access": [
            {
                "namespace": "shop",
                "rules": [
                    {
                        "apiGroups": [""],
                        "resources": ["pods", "pods/log"],
                        "verbs": ["get", "list"],
                    },
                    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get"]},
                ],
            },
            {
                "namespace": "pay",
                "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list"]}],
            },
        ],
    }


@pytest.mark.parametrize("bad", ["shop", "shop:get", "::pods", "a:b:c:d:e", "shop:get:"])
def test_a_malformed_rule_is_a_usage_error(bad):
    with pytest.raises(plugin.Usage):
        plugin.parse_rule(bad)


def test_age_and_columns_read_like_kubectl():
    now = datetime(2026, 12, 4, 12, 0, 0, tzinfo=UTC)
    assert plugin.age("2026-12-04T11:59:30Z", now) == "30s"
    assert plugin.age("2026-12-04T11:00:00Z", now) == "1h"
    assert plugin.age("2026-12-01T12:00:00Z", now) == "3d"
    task = {
        "metadata": {"name": "t", "namespace": "a", "creationTimestamp": "2026-12-04T11:58:00Z"},
        "spec": {"agent": "bot"},
        "status": {"phase": "Active", "reason": "PolicyAllowed", "requester": {"username": "al"}},
    }
    lines = plugin.task_rows([task], False, now).splitlines()
    assert lines[0].split() == ["NAME", "AGENT", "PHASE", "REASON", "REQUESTER", "EXPIRES", "AGE"]
    assert lines[1].split() == ["t", "bot", "Active", "PolicyAllowed", "al", "2m"]
    assert plugin.task_rows([task], True, now).splitlines()[1].split()[0] == "a"
