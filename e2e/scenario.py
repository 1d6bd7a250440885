"""One lifecycle that exercises every permission the chart gives the operator.

Each step names the rules it depends on, so a failure points at the missing one.
Used as the e2e lifecycle and, with one rule removed at a time, to show the
chart's RBAC holds nothing superfluous.
"""

from __future__ import annotations

import time

from tests.integration.cluster import (
    as_token,
    can,
    list_pods_status,
    poll_status,
    unique,
    wait_for,
)

from agent_access.kube import (
    ACCESS_POLICIES,
    AGENT_TASKS,
    CLUSTER_ACCESS_POLICIES,
    NAMESPACES,
    PODS,
    SERVICE_ACCOUNTS,
)

# Rules the operator itself does not hold: granting them needs `escalate`,
# binding them needs `bind`.
GRANT = [
    {"apiGroups": [""], "resources": ["pods", "pods/log"], "verbs": ["get", "list"]},
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]},
]


def run_scenario(world, step_timeout: float = 8.0) -> dict[str, float]:
    timings: dict[str, float] = {}
    agents = world.namespace("e2e-agents")
    label = unique("tier")
    target = world.namespace("e2e-target", labels={"tier": label})
    world.service_account(agents, "bot")
    world.service_account(agents, "bot2")
    world.policy(target, "read", [(agents, "bot"), (agents, "bot2")], GRANT)
    cap = unique("e2e-cap")
    world.cluster_policy(cap, [(agents, "bot")], GRANT, {"matchLabels": {"tier": label}})

    # [accesspolicies/status, clusteraccesspolicies/status: patch] each policy says Ready
    def ready(res, ns, name) -> bool:
        conditions = ((world.kube.get(res, ns, name) or {}).get("status") or {}).get("conditions")
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions or ())

    wait_for(lambda: ready(ACCESS_POLICIES, target, "read"), step_timeout, what="policy Ready")
    wait_for(lambda: ready(CLUSTER_ACCESS_POLICIES, None, cap), step_timeout, what="cap Ready")

    # [subjectaccessreviews: create] a denial names the closest policy to a requester
    # who may read it (the admin here)
    more = [*GRANT, {"apiGroups": [""], "resources": ["secrets"], "verbs": ["list"]}]
    world.task(agents, "too-much", "bot", [{"namespace": target, "rules": more}])
    refused = world.wait_phase(agents, "too-much", {"Active", "Denied"}, step_timeout)
    assert refused["status"]["reason"] == "RuleNotAllowed", refused["status"]
    assert "closest policy" in refused["status"]["message"], refused["status"]

    def task(name: str, agent: str = "bot", **spec) -> dict:
        world.task(agents, name, agent, [{"namespace": target, "rules": GRANT}], **spec)
        got = world.wait_phase(agents, name, {"Active", "Denied", "Failed"}, step_timeout)
        assert got["status"]["phase"] == "Active", got["status"]
        return got

    def revoked(t: dict, phase: str, reason: str, what: str) -> None:
        client = as_token(world.kubeconfig, world.token(t))
        started = time.monotonic()
        yield_ = yield_trigger.pop()
        yield_()
        poll_status(lambda: list_pods_status(client, target), {401, 403}, 2.0)
        timings[what] = time.monotonic() - started
        final = world.wait_phase(agents, t["metadata"]["name"], phase, step_timeout)
        assert final["status"]["reason"] == reason, final["status"]
        wait_for(lambda: world.task_objects(t) == [], step_timeout, what=f"{what}: objects gone")

    yield_trigger: list = []

    # 1. Grant bound to a pod (namespaces get, pods get, serviceaccounts get/create,
    #    roles create + escalate, rolebindings create + bind, secrets create/patch,
    #    serviceaccounts/token create, agenttasks patch, agenttasks/status patch,
    #    events create). Then the pod is deleted (pods watch; deletes of everything).
    world.pod(agents, "worker", "bot")
    t1 = task(unique("pod-bound"), podName="worker")
    client = as_token(world.kubeconfig, world.token(t1))
    assert can(client, "get", "pods", target, subresource="log")
    assert can(client, "get", "configmaps", target)
    assert not can(client, "list", "configmaps", target)
    assert list_pods_status(client, target) == 200
    events = world.events(agents, t1["metadata"]["name"])
    assert any(e["reason"] == "PolicyAllowed" for e in events), "no Event posted"
    yield_trigger.append(lambda: world.kube.delete(PODS, agents, "worker"))
    revoked(t1, "Revoked", "PodDeleted", "pod deleted")

    # 2. Cancel (agenttasks watch/patch).
    t2 = task(unique("cancel"))
    yield_trigger.append(
        lambda: world.kube.merge_patch(
            AGENT_TASKS, agents, t2["metadata"]["name"], {"spec": {"cancel": True}}
        )
    )
    revoked(t2, "Cancelled", "Cancelled", "cancel")

    # 3. The agent's ServiceAccount deleted (serviceaccounts watch).
    t3 = task(unique("agent-gone"), agent="bot2")
    yield_trigger.append(lambda: world.kube.delete(SERVICE_ACCOUNTS, agents, "bot2"))
    revoked(t3, "Revoked", "AgentNotFound", "agent deleted")

    # 4. The namespace loses the label the ClusterAccessPolicy selects, and the
    #    AccessPolicy is narrowed: the grant is no longer covered (namespaces watch,
    #    policy watches).
    t4 = task(unique("selector"))

    def unlabel_and_narrow():
        world.kube.merge_patch(NAMESPACES, None, target, {"metadata": {"labels": {"tier": None}}})
        world.kube.merge_patch(ACCESS_POLICIES, target, "read", {"spec": {"rules": [GRANT[0]]}})

    yield_trigger.append(unlabel_and_narrow)
    revoked(t4, "Revoked", "PolicyChanged", "policy changed")

    # 5. TTL expiry (the timer).
    t5 = world.task(
        agents, unique("ttl"), "bot", [{"namespace": target, "rules": [GRANT[0]]}], ttl="2s"
    )
    name5 = t5["metadata"]["name"]
    world.wait_phase(agents, name5, "Active", step_timeout)
    expired = world.wait_phase(agents, name5, "Expired", step_timeout + 2)
    assert expired["status"]["reason"] == "TTLExpired"

    # 6. Task deleted (the finalizer).
    world.task(agents, "to-delete", "bot", [{"namespace": target, "rules": [GRANT[0]]}])
    t6 = world.wait_phase(agents, "to-delete", "Active", step_timeout)
    world.kube.delete(AGENT_TASKS, agents, "to-delete")
    wait_for(lambda: world.get_task(agents, "to-delete") is None, step_timeout, what="deleted")
    assert world.task_objects(t6) == []
    return timings
