"""Context-aware policy against the real API server: presets, intent patterns, limits
on live tasks (concurrent creates), and the Ready condition policies report."""

from __future__ import annotations

import threading

from agent_access.kube import ACCESS_POLICIES, AGENT_TASKS, KubeError

from .cluster import as_token, list_pods_status, wait_for

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
    assert phases == ["Active"] * 2 + ["Denied"] * 4, phases
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
