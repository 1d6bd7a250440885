"""Crash at every step: the operator dies right after each step of issuance and of
revocation in turn; after a restart every task converges to a correct phase, with
no orphaned object and no live token for a terminal task."""

from __future__ import annotations

import pytest

from agent_access.faults import ENV, ISSUE_STEPS, REVOKE_STEPS
from agent_access.kube import AGENT_TASKS, ROLE_BINDINGS, ROLES, SECRETS, SERVICE_ACCOUNTS

from .cluster import OperatorProcess, as_token, list_pods_status, poll_status, unique, wait_for

READ = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]


@pytest.fixture
def scene(world):
    agents = world.namespace("crash-agents")
    target = world.namespace("crash-target")
    world.service_account(agents, "bot")
    world.policy(target, "read", [(agents, "bot")], READ)
    return agents, target


def objects_of(world, uid: str) -> dict[str, int]:
    selector = f"agentaccess.io/task-uid={uid}"
    return {
        res.plural: len(world.kube.list(res, None, label_selector=selector))
        for res in (SERVICE_ACCOUNTS, SECRETS, ROLES, ROLE_BINDINGS)
    }


def died(proc: OperatorProcess) -> bool:
    return proc.proc.poll() is not None


@pytest.mark.parametrize("step", ISSUE_STEPS)
def test_crash_during_issuance(world, scene, solo, step):
    agents, target = scene
    crashing = solo(env={ENV: step})
    name = unique("crash")
    task = world.task(agents, name, "bot", [{"namespace": target, "rules": READ}])
    uid = task["metadata"]["uid"]
    wait_for(lambda: died(crashing), 10, what=f"the crash after {step}")
    leftover_token = None
    if step == "issue:secret":  # a stored token existed when it died: it must not survive
        plan = world.kube.list(SECRETS, agents, label_selector=f"agentaccess.io/task-uid={uid}")
        import base64

        leftover_token = base64.b64decode(plan[0]["data"]["token"]).decode()
    solo()  # restart, healthy
    final = world.wait_phase(agents, name, "Active", timeout=10)
    assert objects_of(world, uid) == {
        "serviceaccounts": 1,
        "secrets": 1,
        "roles": 2,  # the grant's, and the one letting the agent read its token
        "rolebindings": 2,
    }
    client = as_token(world.kubeconfig, world.token(final))
    assert list_pods_status(client, target) == 200
    if leftover_token:
        old = as_token(world.kubeconfig, leftover_token)
        poll_status(lambda: list_pods_status(old, target), {401}, 15, interval=0.2)
    world.kube.merge_patch(AGENT_TASKS, agents, name, {"spec": {"cancel": True}})
    world.wait_phase(agents, name, "Cancelled")
    wait_for(lambda: sum(objects_of(world, uid).values()) == 0, 5, what="no objects left")


@pytest.mark.parametrize("step", REVOKE_STEPS)
def test_crash_during_revocation(world, scene, solo, step):
    agents, target = scene
    healthy = solo()
    name = unique("crash")
    world.task(agents, name, "bot", [{"namespace": target, "rules": READ}])
    task = world.wait_phase(agents, name, "Active")
    uid = task["metadata"]["uid"]
    client = as_token(world.kubeconfig, world.token(task))
    healthy.kill()
    crashing = solo(env={ENV: step})
    world.kube.merge_patch(AGENT_TASKS, agents, name, {"spec": {"cancel": True}})
    wait_for(lambda: died(crashing), 10, what=f"the crash after {step}")
    # every step after the bindings already refuses the token
    assert list_pods_status(client, target) in (401, 403)
    solo()
    final = world.wait_phase(agents, name, "Cancelled", timeout=10)
    assert final["status"]["reason"] == "Cancelled"
    wait_for(lambda: sum(objects_of(world, uid).values()) == 0, 5, what="no objects left")
    poll_status(lambda: list_pods_status(client, target), {401}, 15, interval=0.2)
