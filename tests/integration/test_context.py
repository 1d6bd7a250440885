"""Context-aware policy against the real API server: presets, intent patterns, limits
on live tasks (concurrent creates), and the Ready condition policies report."""

from __future__ import annotations

import threading

from agent_access.kube import (
    ACCESS_POLICIES,
    AGENT_TASKS,
    NAMESPACES,
    SERVICE_ACCOUNTS,
    KubeError,
)

from .cluster import as_token, list_pods_status, poll_status, wait_for

READ = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]
LOGS = [{"apiGroups": [""], "resources": ["pods", "pods/log"], "verbs": ["get", "list"]}]


def scene(world, **policy):
    agents, target = world.namespace("ctx-agents"), world.namespace("ctx-target")
    world.service_account(agents, "bot")
    world.policy(target, "p", [(agents, "bot")], READ, **policy)
    return agents, target


def ready(world, ns, name):
    def check():
        status = (world.kube.get(ACCESS_POLICIES, ns, name) or {}).get("status") or {}
        return next((c for c in status.get("conditions") or () if c["type"] == "Ready"), None)

    return wait_for(check, 10, what=f"{ns}/{name} Ready condition")


def test_a_task_asks_for_a_preset_by_name(world, operator):
    agents, target = scene(world, presets={"read-logs": LOGS})
    world.task(agents, "logs", "bot", [{"namespace": target, "preset": "read-logs"}])
    task = world.wait_phase(agents, "logs", "Active")
    (grant,) = task["status"]["grants"]
    assert grant["rules"] == LOGS  # the preset's rules, as granted
    client = as_token(world.kubeconfig, world.token(task))
    assert list_pods_status(client, target) == 200
    world.task(agents, "nope", "bot", [{"namespace": target, "preset": "write-all"}])
    denied = world.wait_phase(agents, "nope", "Denied")
    assert denied["status"]["reason"] == "NoMatchingPolicy"
    assert "preset 'write-all'" in denied["status"]["message"]
    try:
        world.task(agents, "both", "bot", [{"namespace": target, "preset": "x", "rules": READ}])
        raise AssertionError("rules and a preset together were accepted")
    except KubeError as exc:
        assert exc.status == 422 and "exactly one" in exc.reason
    # the preset is redefined without pods/log: the live grant is re-checked and ends
    world.kube.merge_patch(ACCESS_POLICIES, target, "p", {"spec": {"presets": {"read-logs": READ}}})
    ended = world.wait_phase(agents, "logs", "Revoked")
    assert ended["status"]["reason"] == "PolicyChanged"


def test_intent_must_match_the_policy_pattern(world, operator):
    agents, target = scene(world, intent={"pattern": "^(INC|CHG)-[0-9]+: .{10,}"})
    assert ready(world, target, "p")["status"] == "True"
    world.task(agents, "vague", "bot", [{"namespace": target, "rules": READ}], intent="look around")
    vague = world.wait_phase(agents, "vague", "Denied")
    assert vague["status"]["reason"] == "IntentRejected"
    assert "^(INC|CHG)-[0-9]+" in vague["status"]["message"]
    world.task(
        agents, "ticket", "bot", [{"namespace": target, "rules": READ}],
        intent="INC-4711: summarize the pod logs for on-call",
    )  # fmt: skip
    world.wait_phase(agents, "ticket", "Active")


def test_a_pattern_that_is_not_re2_makes_the_policy_match_nothing(world, operator):
    agents, target = scene(world, intent={"pattern": "(INC"})
    cond = ready(world, target, "p")
    assert (cond["status"], cond["reason"]) == ("False", "InvalidIntentPattern"), cond
    assert "missing )" in cond["message"]
    world.task(agents, "any", "bot", [{"namespace": target, "rules": READ}], intent="(INC-1: x")
    assert world.wait_phase(agents, "any", "Denied")["status"]["reason"] == "NoMatchingPolicy"
    # fixed: Ready again, and tasks are granted
    world.kube.merge_patch(ACCESS_POLICIES, target, "p", {"spec": {"intent": {"pattern": "INC"}}})
    wait_for(lambda: ready(world, target, "p")["status"] == "True", 10, what="Ready again")
    world.task(agents, "again", "bot", [{"namespace": target, "rules": READ}], intent="INC-1: x")
    world.wait_phase(agents, "again", "Active")


def test_max_active_tasks_holds_when_tasks_arrive_together(world, operator):
    agents, target = scene(world, maxActiveTasks=2)
    names = [f"burst-{i}" for i in range(6)]

    def create(name):
        world.task(agents, name, "bot", [{"namespace": target, "rules": READ}])

    threads = [threading.Thread(target=create, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = [world.wait_phase(agents, n, {"Active", "Denied"}) for n in names]
    phases = sorted(t["status"]["phase"] for t in done)
    assert phases == ["Active"] * 2 + ["Denied"] * 4, [
        (t["status"]["phase"], t["status"]["reason"], t["status"]["message"]) for t in done
    ]
    refused = [t for t in done if t["status"]["phase"] == "Denied"]
    assert all(t["status"]["reason"] == "LimitExceeded" for t in refused)
    assert "allows 2 at once" in refused[0]["status"]["message"]
    # one ends: room for one more
    live = next(t for t in done if t["status"]["phase"] == "Active")
    world.kube.merge_patch(
        AGENT_TASKS, agents, live["metadata"]["name"], {"spec": {"cancel": True}}
    )
    world.wait_phase(agents, live["metadata"]["name"], "Cancelled")
    world.task(agents, "after", "bot", [{"namespace": target, "rules": READ}])
    world.wait_phase(agents, "after", "Active")
    world.task(agents, "over", "bot", [{"namespace": target, "rules": READ}])
    assert world.wait_phase(agents, "over", "Denied")["status"]["reason"] == "LimitExceeded"


RESTRICTED = {
    "expression": "namespace.metadata.labels['data-class'] != 'restricted' || "
    "duration(task.spec.ttl) <= duration('10m')",
    "message": "restricted data only for 10 minutes",
}


def test_conditions_hold_at_grant_time(world, operator):
    agents, target = scene(world, conditions=[RESTRICTED])
    world.kube.merge_patch(
        NAMESPACES, None, target, {"metadata": {"labels": {"data-class": "restricted"}}}
    )
    world.task(agents, "long", "bot", [{"namespace": target, "rules": READ}], ttl="1h")
    long = world.wait_phase(agents, "long", "Denied")["status"]
    assert long["reason"] == "ConditionFailed", long
    assert "restricted data only for 10 minutes" in long["message"]
    world.task(agents, "short", "bot", [{"namespace": target, "rules": READ}], ttl="5m")
    world.wait_phase(agents, "short", "Active")


def test_a_grant_whose_conditions_stop_holding_is_revoked(world, operator):
    agents, target = scene(world, conditions=[RESTRICTED])
    world.kube.merge_patch(
        NAMESPACES, None, target, {"metadata": {"labels": {"data-class": "public"}}}
    )
    world.task(agents, "live", "bot", [{"namespace": target, "rules": READ}], ttl="1h")
    task = world.wait_phase(agents, "live", "Active")
    client = as_token(world.kubeconfig, world.token(task))
    assert list_pods_status(client, target) == 200
    world.kube.merge_patch(
        NAMESPACES, None, target, {"metadata": {"labels": {"data-class": "restricted"}}}
    )
    poll_status(lambda: list_pods_status(client, target), {401, 403}, 5.0)
    done = world.wait_phase(agents, "live", "Revoked")["status"]
    assert done["reason"] == "ConditionFailed", done
    assert "restricted data only for 10 minutes" in done["message"]
    wait_for(lambda: world.task_objects(task) == [], 10, what="the grant's objects gone")


def test_conditions_on_the_agent_and_the_requester(world, operator):
    trusted = {
        "expression": "agent.metadata.labels[?'tier'] == optional.of('trusted') && "
        "requester.username == 'admin'",
        "message": "trusted agents, asked by admin",
    }
    agents, target = scene(world, conditions=[trusted])
    world.task(agents, "untrusted", "bot", [{"namespace": target, "rules": READ}])
    assert world.wait_phase(agents, "untrusted", "Denied")["status"]["reason"] == "ConditionFailed"
    world.kube.merge_patch(
        SERVICE_ACCOUNTS, agents, "bot", {"metadata": {"labels": {"tier": "trusted"}}}
    )
    world.task(agents, "trusted", "bot", [{"namespace": target, "rules": READ}])
    world.wait_phase(agents, "trusted", "Active")
    world.kube.merge_patch(
        SERVICE_ACCOUNTS, agents, "bot", {"metadata": {"labels": {"tier": None}}}
    )
    assert world.wait_phase(agents, "trusted", "Revoked")["status"]["reason"] == "ConditionFailed"


def test_an_expression_that_does_not_compile_is_reported_on_the_policy(world, operator):
    agents, target = scene(world, conditions=[{"expression": "namespace.metadata.labels["}])
    cond = ready(world, target, "p")
    assert (cond["status"], cond["reason"]) == ("False", "InvalidCondition"), cond
    assert "spec.conditions[0]" in cond["message"] and "Syntax error" in cond["message"]
    world.task(agents, "any", "bot", [{"namespace": target, "rules": READ}])
    assert world.wait_phase(agents, "any", "Denied")["status"]["reason"] == "NoMatchingPolicy"
    typed = {"expression": "'not a bool'"}
    world.kube.merge_patch(ACCESS_POLICIES, target, "p", {"spec": {"conditions": [typed]}})
    wait_for(lambda: "not bool" in ready(world, target, "p")["message"], 10, what="type error")


def test_time_windows_are_rechecked_without_any_event(world, solo):
    """A condition on `now` ends the grant once it stops holding (the periodic re-check;
    its period is shortened for the test)."""
    from datetime import UTC, datetime, timedelta

    solo(env={"AAO_CONDITIONS_PERIOD": "1"})
    until = (datetime.now(UTC) + timedelta(seconds=4)).strftime("%Y-%m-%dT%H:%M:%SZ")
    window = {"expression": f"now < timestamp('{until}')", "message": "the change window is over"}
    agents, target = scene(world, conditions=[window])
    world.task(agents, "window", "bot", [{"namespace": target, "rules": READ}], ttl="1h")
    world.wait_phase(agents, "window", "Active")
    done = world.wait_phase(agents, "window", "Revoked", timeout=15)["status"]
    assert done["reason"] == "ConditionFailed" and "change window is over" in done["message"]
