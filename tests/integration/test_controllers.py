"""What kube-controller-manager does to the operator's promises, on the real thing
(the local control plane runs its garbage collector, ServiceAccount token
controller and namespace controller).

- A task's pod deleted while the operator is down: the garbage collector removes
  the per-task identity (the pod owns it) and the API server refuses the token.
- A legacy `kubernetes.io/service-account-token` Secret really gets a token here,
  so refusing one for a per-task identity guards against a real danger.
- Namespaces deleted with live grants in them: revoked, nothing left, nothing stuck.
"""

from __future__ import annotations

import time

import pytest

from agent_access.kube import NAMESPACES, PODS, SECRETS, SERVICE_ACCOUNTS, KubeError

from .cluster import as_token, as_user, list_pods_status, poll_status, record_timing, wait_for

READ_PODS = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]


@pytest.fixture(scope="module")
def controllers(kubeconfig):
    import controlplane

    state = controlplane.read_state()
    assert state and "kube-controller-manager" in state["pids"], "no kube-controller-manager"
    wait_for(lambda: controlplane.controller_manager_ready(state), 60, 0.2, "controllers synced")


def _granted(world, pod: bool = True):
    agents = world.namespace("agents")
    target = world.namespace("target")
    world.service_account(agents, "bot")
    world.policy(target, "read", [(agents, "bot")], READ_PODS)
    spec = {}
    if pod:
        world.pod(agents, "agent-pod", "bot")
        spec["podName"] = "agent-pod"
    name = "gc-task"
    world.task(agents, name, "bot", [{"namespace": target, "rules": READ_PODS}], **spec)
    task = world.wait_phase(agents, name, "Active")
    client = as_token(world.kubeconfig, world.token(task))
    assert list_pods_status(client, target) == 200
    return agents, target, task, client


def test_pod_deleted_while_operator_down_kills_the_token(world, operator, controllers):
    agents, target, task, client = _granted(world)
    sa = task["status"]["serviceAccountName"]
    operator.kill()
    try:
        started = time.monotonic()
        world.kube.delete(PODS, agents, "agent-pod")
        wait_for(
            lambda: world.kube.get(SERVICE_ACCOUNTS, agents, sa) is None,
            60,
            0.05,
            "the garbage collector removed the per-task ServiceAccount",
        )
        collected = time.monotonic() - started
        assert world.kube.get(SECRETS, agents, task["status"]["tokenSecretName"]) is None
        poll_status(lambda: list_pods_status(client, target), {401}, 30, interval=0.1)
        refused = time.monotonic() - started
        record_timing("operator down: pod deleted -> identity collected", collected)
        record_timing("operator down: pod deleted -> token refused (401)", refused)
    finally:
        operator.start()
    # Back up: the grant ends for the right reason and nothing of it is left.
    ended = world.wait_phase(agents, "gc-task", "Revoked", timeout=15)
    assert ended["status"]["reason"] == "PodDeleted"
    wait_for(lambda: world.task_objects(task) == [], 10, what="no objects left")
    assert "Traceback" not in operator.logs()


def test_legacy_token_secrets_are_real_and_refused_for_task_identities(
    world, operator, controllers
):
    """An admin's legacy token Secret is filled by the token controller (a token that
    lives as long as the Secret). The same for a per-task identity is refused, by
    whoever asks, and a per-task identity cannot make one for anyone."""
    agents, _target, task, client = _granted(world, pod=False)
    world.service_account(agents, "legacy")
    world.kube.create(
        SECRETS,
        agents,
        {
            "metadata": {
                "name": "legacy-token",
                "annotations": {"kubernetes.io/service-account.name": "legacy"},
            },
            "type": "kubernetes.io/service-account-token",
        },
    )
    filled = wait_for(
        lambda: (world.kube.get(SECRETS, agents, "legacy-token").get("data") or {}).get("token"),
        30,
        0.1,
        "the token controller filled the legacy Secret",
    )
    assert filled
    sa = task["status"]["serviceAccountName"]
    body = {
        "metadata": {
            "name": "lasting",
            "annotations": {"kubernetes.io/service-account.name": sa},
        },
        "type": "kubernetes.io/service-account-token",
    }
    for who in (world.kube, as_user(world.kubeconfig, "someone", ("dev",))):
        with pytest.raises(KubeError) as refused:
            who.create(SECRETS, agents, body)
        assert refused.value.status in (403, 422), refused.value
    with pytest.raises(KubeError) as refused:  # the per-task identity itself
        client.create(SECRETS, agents, {**body, "metadata": {**body["metadata"], "name": "mine"}})
    assert refused.value.status == 403
    time.sleep(1)  # had any been stored, the controller would have filled it by now
    assert world.kube.get(SECRETS, agents, "lasting") is None


def test_deleting_namespaces_with_live_grants(world, operator, controllers):
    """The target namespace deleted: the grant is revoked at once (bindings first) and
    the namespace controller finishes; the task's namespace deleted: its tasks are
    deleted through the finalizer, revoked, and the namespace goes away."""
    agents, target, task, client = _granted(world, pod=False)
    started = time.monotonic()
    world.kube.delete(NAMESPACES, None, target)
    poll_status(lambda: list_pods_status(client, target), {401, 403}, 10)
    record_timing("target namespace deleted -> 403", time.monotonic() - started)
    ended = world.wait_phase(agents, "gc-task", {"Revoked", "Completed"}, timeout=10)
    assert ended["status"]["phase"] == "Revoked", ended["status"]
    wait_for(lambda: world.kube.get(NAMESPACES, None, target) is None, 60, 0.2, "target gone")
    wait_for(lambda: world.task_objects(task) == [], 10, what="no objects left")

    agents2, target2, task2, client2 = _granted(world, pod=False)
    world.kube.delete(NAMESPACES, None, agents2)
    poll_status(lambda: list_pods_status(client2, target2), {401, 403}, 15)
    wait_for(lambda: world.kube.get(NAMESPACES, None, agents2) is None, 60, 0.2, "agents gone")
    wait_for(lambda: world.task_objects(task2) == [], 10, what="no objects left")
    ends = [
        line["event"]
        for line in operator.audit_lines()
        if line["task"]["uid"] == task2["metadata"]["uid"]
    ]
    # The namespace controller deletes the agent or the task first: either ends it.
    assert ends[0] == "granted" and ends[1] in ("revoked", "deleted"), ends
    assert ends.count("revoked") <= 1, ends
    assert "Traceback" not in operator.logs()
