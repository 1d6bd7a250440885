"""Suspending an agent, against the real API server: annotating its ServiceAccount (or
labelling its namespace) `agentaccess.io/suspended` revokes every live grant of it at
once and denies new tasks, until the mark is removed."""

from __future__ import annotations

import time

from agent_access.kube import NAMESPACES, SERVICE_ACCOUNTS

from .cluster import as_token, list_pods_status, poll_status, record_timing, wait_for

READ = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]
MARK = "agentaccess.io/suspended"


def scene(world):
    agents, target = world.namespace("susp-agents"), world.namespace("susp-target")
    for sa in ("bot", "other"):
        world.service_account(agents, sa)
    world.policy(target, "read", [(agents, "bot"), (agents, "other")], READ)
    return agents, target


def grant(world, agents, target, name, agent="bot"):
    world.task(agents, name, agent, [{"namespace": target, "rules": READ}])
    task = world.wait_phase(agents, name, {"Active", "Denied"})
    return task


def acts_again(world, agents, target, agent):
    """Once the mark is gone, a new task of the agent is granted again."""

    def granted() -> bool:
        name = f"again-{time.monotonic_ns()}"
        return grant(world, agents, target, name, agent)["status"]["phase"] == "Active"

    wait_for(granted, 10, 0.5, what=f"{agent} acts again once the mark is gone")


def ended_suspended(world, agents, task):
    done = world.wait_phase(agents, task["metadata"]["name"], "Revoked")
    assert done["status"]["reason"] == "AgentSuspended", done["status"]
    wait_for(lambda: world.task_objects(task) == [], 10, what="the grant's objects gone")
    return done


def test_suspending_an_agent_revokes_its_grants_at_once_and_denies_it_new_ones(world, operator):
    agents, target = scene(world)
    mine = [grant(world, agents, target, n) for n in ("a1", "a2")]
    theirs = grant(world, agents, target, "o1", agent="other")
    clients = [as_token(world.kubeconfig, world.token(t)) for t in (*mine, theirs)]
    assert all(list_pods_status(c, target) == 200 for c in clients)
    started = time.monotonic()
    world.kube.merge_patch(
        SERVICE_ACCOUNTS, agents, "bot", {"metadata": {"annotations": {MARK: "true"}}}
    )
    for c in clients[:2]:
        poll_status(lambda c=c: list_pods_status(c, target), {401, 403}, 2.0)
    record_timing("suspend agent (2 live grants) -> 403", time.monotonic() - started)
    for t in mine:
        done = ended_suspended(world, agents, t)
        assert "bot is suspended" in done["status"]["message"]
    assert list_pods_status(clients[2], target) == 200  # another agent keeps its grant
    assert world.get_task(agents, "o1")["status"]["phase"] == "Active"
    refused = grant(world, agents, target, "a3")
    assert (refused["status"]["phase"], refused["status"]["reason"]) == (
        "Denied",
        "AgentSuspended",
    )
    world.kube.merge_patch(
        SERVICE_ACCOUNTS, agents, "bot", {"metadata": {"annotations": {MARK: None}}}
    )
    acts_again(world, agents, target, "bot")


def test_suspending_a_namespace_revokes_every_agent_in_it(world, operator):
    agents, target = scene(world)
    tasks = [grant(world, agents, target, "n1"), grant(world, agents, target, "n2", "other")]
    clients = [as_token(world.kubeconfig, world.token(t)) for t in tasks]
    started = time.monotonic()
    world.kube.merge_patch(NAMESPACES, None, agents, {"metadata": {"labels": {MARK: "true"}}})
    for c in clients:
        poll_status(lambda c=c: list_pods_status(c, target), {401, 403}, 2.0)
    record_timing("suspend namespace (2 agents) -> 403", time.monotonic() - started)
    for t in tasks:
        assert (
            f"namespace {agents} is suspended"
            in ended_suspended(world, agents, t)["status"]["message"]
        )
    refused = grant(world, agents, target, "n3", "other")
    assert refused["status"]["reason"] == "AgentSuspended"
    world.kube.merge_patch(NAMESPACES, None, agents, {"metadata": {"labels": {MARK: None}}})
    acts_again(world, agents, target, "other")
