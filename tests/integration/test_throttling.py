"""429 and 5xx from the API (30% of the operator's requests, through a fault proxy)
are retried with backoff, and the results are still correct."""

from __future__ import annotations

from agent_access.kube import AGENT_TASKS

from .cluster import as_token, list_pods_status, poll_status, unique, wait_for
from .faultproxy import FaultProxy

READ = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]


def test_correct_under_429_and_5xx(world, solo, kubeconfig, tmp_path):
    proxy = FaultProxy(kubeconfig, tmp_path, rate=0.3)
    op = solo(config=proxy.kubeconfig)
    agents = world.namespace("throttle-agents")
    target = world.namespace("throttle-target")
    world.service_account(agents, "bot")
    world.policy(target, "read", [(agents, "bot")], READ)
    names = [unique("thr") for _ in range(6)]
    for name in names:
        world.task(agents, name, "bot", [{"namespace": target, "rules": READ}])
    denied = unique("thr-deny")
    world.task(
        agents,
        denied,
        "bot",
        [
            {
                "namespace": target,
                "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}],
            }
        ],
    )
    tasks = [world.wait_phase(agents, n, "Active", timeout=30) for n in names]
    assert (
        world.wait_phase(agents, denied, "Denied", timeout=30)["status"]["reason"]
        == "RuleNotAllowed"
    )
    for task in tasks:
        client = as_token(world.kubeconfig, world.token(task))
        assert list_pods_status(client, target) == 200
        world.kube.merge_patch(
            AGENT_TASKS, agents, task["metadata"]["name"], {"spec": {"cancel": True}}
        )
        poll_status(lambda c=client: list_pods_status(c, target), {401, 403}, 10)
    for task in tasks:
        world.wait_phase(agents, task["metadata"]["name"], "Cancelled", timeout=30)
        wait_for(lambda t=task: world.task_objects(t) == [], 10, what="objects gone")
    assert proxy.total_injected >= 10, proxy.injected
    assert "agentaccess_kubernetes_api_errors_total" in op.metrics()
    assert op.proc.poll() is None
