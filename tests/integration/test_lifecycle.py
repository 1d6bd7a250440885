"""The grant lifecycle with the operator running: grant exactly, revoke on every trigger."""

from __future__ import annotations

import time

import pytest

from agent_access.kube import (
    ACCESS_POLICIES,
    AGENT_TASKS,
    PODS,
    SERVICE_ACCOUNTS,
)

from .cluster import (
    as_token,
    can,
    list_pods_status,
    poll_status,
    record_timing,
    unique,
    wait_for,
)

READ_PODS = [{"apiGroups": [""], "resources": ["pods", "pods/log"], "verbs": ["get", "list"]}]
POLICY_RULES = [
    {"apiGroups": [""], "resources": ["pods", "pods/log"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get"]},
]


@pytest.fixture
def scene(world, operator):
    """An agent namespace with triage-bot, and a target namespace with a policy for it."""
    agents = world.namespace("agents")
    target = world.namespace("payments")
    world.service_account(agents, "triage-bot")
    world.policy(target, "triage-read", [(agents, "triage-bot")], POLICY_RULES, maxTTL="30m")
    return agents, target


def grant(world, agents, target, ttl="10m", rules=None, **spec):
    name = unique("task")
    world.task(
        agents,
        name,
        "triage-bot",
        [{"namespace": target, "rules": rules or READ_PODS}],
        ttl=ttl,
        **spec,
    )
    task = world.wait_phase(agents, name, {"Active", "Denied", "Failed"})
    assert task["status"]["phase"] == "Active", task["status"]
    return task


def test_grant_is_exact(world, scene):
    agents, target = scene
    other = world.namespace("other")
    world.policy(other, "triage-read", [(agents, "triage-bot")], POLICY_RULES)
    name = unique("task")
    world.task(
        agents,
        name,
        "triage-bot",
        [
            {"namespace": target, "rules": READ_PODS},
            {
                "namespace": other,
                "rules": [
                    {
                        "apiGroups": ["apps"],
                        "resources": ["deployments"],
                        "verbs": ["get"],
                        "resourceNames": ["checkout"],
                    }
                ],
            },
        ],
    )
    task = world.wait_phase(agents, name, "Active")
    st = task["status"]
    assert st["reason"] == "PolicyAllowed"
    assert st["observedGeneration"] == 1
    assert sorted(st["policies"]) == sorted([f"{target}/triage-read", f"{other}/triage-read"])
    assert {g["namespace"] for g in st["grants"]} == {target, other}
    assert st["message"].startswith("granted ")
    cond = {c["type"]: c for c in st["conditions"]}["Granted"]
    assert cond["status"] == "True" and cond["reason"] == "PolicyAllowed"
    for field in ("serviceAccountName", "tokenSecretName", "grantedAt", "expiresAt"):
        assert st[field]
    assert st["serviceAccountName"] != "triage-bot"

    client = as_token(world.kubeconfig, world.token(task))
    assert can(client, "get", "pods", target)
    assert can(client, "list", "pods", target)
    assert can(client, "get", "pods", target, subresource="log")
    assert not can(client, "watch", "pods", target)  # in the policy, not requested
    assert not can(client, "delete", "pods", target)
    assert not can(client, "create", "pods", target)
    assert not can(client, "get", "secrets", target)
    assert not can(client, "get", "deployments", target, group="apps")
    assert not can(client, "list", "pods", agents)  # not requested in its own namespace
    assert not can(client, "list", "pods", "default")
    assert can(client, "get", "deployments", other, group="apps", name="checkout")
    assert not can(client, "get", "deployments", other, group="apps", name="payments")
    assert not can(client, "list", "pods", other)
    assert list_pods_status(client, target) == 200
    events = [e["reason"] for e in world.events(agents, name)]
    assert "PolicyAllowed" in events


def test_ttl_is_clamped_by_max_ttl(world, scene):
    agents, target = scene
    task = grant(world, agents, target, ttl="3h")
    from agent_access.runtime import parse_time

    st = task["status"]
    assert (parse_time(st["expiresAt"]) - parse_time(st["grantedAt"])).total_seconds() == 1800


def _assert_revoked(world, task, client, ns, started, trigger, phase, reason):
    poll_status(lambda: list_pods_status(client, ns), {403, 401}, 2.0)
    record_timing(f"revoke {trigger}: trigger -> 403", time.monotonic() - started)
    assert time.monotonic() - started < 2.0
    poll_status(lambda: list_pods_status(client, ns), {401}, 20, interval=0.2)
    record_timing(f"revoke {trigger}: trigger -> 401", time.monotonic() - started)
    meta = task["metadata"]
    if phase:
        final = world.wait_phase(meta["namespace"], meta["name"], phase, timeout=5)
        assert final["status"]["reason"] == reason
        assert final["status"]["endedAt"]
        cond = {c["type"]: c for c in final["status"]["conditions"]}["Granted"]
        assert cond["status"] == "False" and cond["reason"] == reason
    assert world.task_objects(task) == []


def _live(world, scene, **spec):
    agents, target = scene
    task = grant(world, agents, target, **spec)
    client = as_token(world.kubeconfig, world.token(task))
    assert list_pods_status(client, target) == 200
    return task, client, target


def test_revoke_on_ttl_expiry(world, scene):
    task, client, target = _live(world, scene, ttl="3s")
    from agent_access.runtime import parse_time

    expires = parse_time(task["status"]["expiresAt"]).timestamp()
    time.sleep(max(0, expires - time.time()))
    started = time.monotonic() - max(0, time.time() - expires)
    _assert_revoked(world, task, client, target, started, "ttl", "Expired", "TTLExpired")


def test_revoke_on_cancel(world, scene):
    task, client, target = _live(world, scene)
    meta = task["metadata"]
    started = time.monotonic()
    world.kube.merge_patch(AGENT_TASKS, meta["namespace"], meta["name"], {"spec": {"cancel": True}})
    _assert_revoked(world, task, client, target, started, "cancel", "Cancelled", "Cancelled")


def test_revoke_on_task_deleted(world, scene):
    task, client, target = _live(world, scene)
    meta = task["metadata"]
    started = time.monotonic()
    world.kube.delete(AGENT_TASKS, meta["namespace"], meta["name"])
    _assert_revoked(world, task, client, target, started, "task_deleted", None, None)
    wait_for(lambda: world.get_task(meta["namespace"], meta["name"]) is None, 5, what="task gone")
    assert any(e["reason"] == "TaskDeleted" for e in world.events(meta["namespace"], meta["name"]))


@pytest.mark.parametrize("phase,reason", [("Succeeded", "PodSucceeded"), ("Failed", "PodFailed")])
def test_revoke_when_pod_finishes(world, scene, phase, reason):
    agents, _ = scene
    pod = unique("agent-pod")
    world.pod(agents, pod, "triage-bot")
    task, client, target = _live(world, scene, podName=pod)
    assert task["status"]["podUID"]
    started = time.monotonic()
    world.set_pod_phase(agents, pod, phase)
    _assert_revoked(
        world, task, client, target, started, f"pod_{phase.lower()}", "Completed", reason
    )


def test_revoke_when_pod_deleted(world, scene):
    agents, _ = scene
    pod = unique("agent-pod")
    world.pod(agents, pod, "triage-bot")
    task, client, target = _live(world, scene, podName=pod)
    started = time.monotonic()
    world.kube.delete(PODS, agents, pod)
    _assert_revoked(world, task, client, target, started, "pod_deleted", "Revoked", "PodDeleted")


def test_revoke_when_policy_changed(world, scene):
    agents, target = scene
    task, client, _ = _live(world, scene)
    started = time.monotonic()
    world.kube.merge_patch(
        ACCESS_POLICIES,
        target,
        "triage-read",
        {"spec": {"rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]}},
    )
    _assert_revoked(
        world, task, client, target, started, "policy_changed", "Revoked", "PolicyChanged"
    )
    final = world.get_task(agents, task["metadata"]["name"])
    assert "pods/log" in final["status"]["message"] or "list" in final["status"]["message"]


def test_policy_change_that_still_allows_keeps_the_grant(world, scene):
    agents, target = scene
    task, client, _ = _live(world, scene)
    world.kube.merge_patch(
        ACCESS_POLICIES,
        target,
        "triage-read",
        {
            "spec": {
                "rules": [
                    *POLICY_RULES,
                    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]},
                ]
            }
        },
    )
    time.sleep(1)
    assert list_pods_status(client, target) == 200
    assert world.get_task(agents, task["metadata"]["name"])["status"]["phase"] == "Active"


def test_revoke_when_policy_deleted(world, scene):
    _, target = scene
    task, client, _ = _live(world, scene)
    started = time.monotonic()
    world.kube.delete(ACCESS_POLICIES, target, "triage-read")
    _assert_revoked(
        world, task, client, target, started, "policy_deleted", "Revoked", "PolicyDeleted"
    )


def test_revoke_when_agent_deleted(world, scene):
    agents, _ = scene
    task, client, target = _live(world, scene)
    started = time.monotonic()
    world.kube.delete(SERVICE_ACCOUNTS, agents, "triage-bot")
    _assert_revoked(
        world, task, client, target, started, "agent_deleted", "Revoked", "AgentNotFound"
    )


def test_cluster_access_policy_by_namespace_selector(world, operator):
    agents = world.namespace("agents")
    label = unique("team")
    target = world.namespace("shop", labels={"team": label})
    unlabelled = world.namespace("shop")
    world.service_account(agents, "triage-bot")
    world.cluster_policy(
        unique("cap"),
        [(agents, "triage-bot")],
        READ_PODS,
        {"matchLabels": {"team": label}},
        maxTTL="20m",
    )
    task = grant(world, agents, target)
    assert task["status"]["policies"][0].startswith("cap-")
    name = unique("task")
    world.task(agents, name, "triage-bot", [{"namespace": unlabelled, "rules": READ_PODS}])
    denied = world.wait_phase(agents, name, "Denied")
    assert denied["status"]["reason"] == "NoMatchingPolicy"


def test_terminal_phase_is_kept_and_never_returns_to_active(world, scene):
    agents, target = scene
    task, client, _ = _live(world, scene)
    meta = task["metadata"]
    world.kube.merge_patch(AGENT_TASKS, agents, meta["name"], {"spec": {"cancel": True}})
    poll_status(lambda: list_pods_status(client, target), {401, 403}, 2)
    world.wait_phase(agents, meta["name"], "Cancelled")
    # touching the task (a label) must not bring access back
    world.kube.merge_patch(
        AGENT_TASKS, agents, meta["name"], {"metadata": {"labels": {"touched": "yes"}}}
    )
    time.sleep(1)
    assert world.get_task(agents, meta["name"])["status"]["phase"] == "Cancelled"
    assert world.task_objects(task) == []
