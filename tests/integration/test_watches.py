"""Facts come from watches: what happens when a watch breaks, and that a decision
makes no read calls.

The operator talks to the API server through a proxy that can drop its watches
and refuse new ones (a network partition of the watch alone)."""

from __future__ import annotations

import re
import time

from agent_access.kube import ACCESS_POLICIES

from .cluster import as_token, list_pods_status, poll_status, record_timing, unique, wait_for

READ = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]


def scene(world):
    agents = world.namespace("w-agents")
    target = world.namespace("w-target")
    world.service_account(agents, "bot")
    world.policy(target, "read", [(agents, "bot")], READ)
    return agents, target


def grant(world, agents, target):
    name = unique("w")
    world.task(agents, name, "bot", [{"namespace": target, "rules": READ}])
    task = world.wait_phase(agents, name, {"Active", "Denied"})
    return name, task


def test_a_policy_deleted_while_its_watch_is_down_still_revokes(world, solo, kubeconfig, tmp_path):
    from .faultproxy import FaultProxy

    proxy = FaultProxy(kubeconfig, tmp_path, rate=0.0)
    op = solo(config=proxy.kubeconfig)
    agents, target = scene(world)
    first, task = grant(world, agents, target)
    assert task["status"]["phase"] == "Active"
    client = as_token(world.kubeconfig, world.token(task))

    proxy.refuse_watches.add("/accesspolicies")
    proxy.cut_watches("/accesspolicies")
    wait_for(lambda: proxy.injected["WATCH 503"] >= 1, 10, what="the watch is down")
    # Without its watch the operator reads: a decision now still sees the policy...
    second, task2 = grant(world, agents, target)
    assert task2["status"]["phase"] == "Active"
    world.kube.delete(ACCESS_POLICIES, target, "read")
    # ...and then sees it gone (never a stale cache).
    _third, task3 = grant(world, agents, target)
    assert task3["status"]["phase"] == "Denied", task3["status"]
    assert list_pods_status(client, target) == 200  # no event reached the operator yet

    started = time.monotonic()
    proxy.refuse_watches.clear()
    poll_status(lambda: list_pods_status(client, target), {403, 401}, 20, interval=0.05)
    record_timing(
        "watch back -> grant of a policy deleted meanwhile refused", time.monotonic() - started
    )
    for name in (first, second):
        got = world.wait_phase(agents, name, "Revoked")
        assert got["status"]["reason"] in ("PolicyDeleted", "PolicyChanged"), got["status"]
    assert "Traceback" not in op.logs()


def _operator_requests(metrics: str) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for line in metrics.splitlines():
        if line.startswith("agentaccess_kubernetes_api_requests_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            key = (labels["verb"], labels["resource"])
            out[key] = out.get(key, 0) + float(line.rsplit(" ", 1)[1])
    return out


def test_a_decision_makes_no_read_calls(world, operator):
    agents, target = scene(world)
    world.pod(agents, "agent-pod", "bot")
    grant(world, agents, target)  # warm up: the operator has seen this scene
    before = _operator_requests(operator.metrics())
    names = []
    for _ in range(5):
        name = unique("nr")
        world.task(agents, name, "bot", [{"namespace": target, "rules": READ}], podName="agent-pod")
        names.append(name)
    for name in names:
        assert world.wait_phase(agents, name, {"Active", "Denied"})["status"]["phase"] == "Active"
    wait_for(lambda: len(world.events(agents, names[-1])) >= 1, 5, what="events posted")
    after = _operator_requests(operator.metrics())
    delta = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0) > 0}
    reads = {k: v for k, v in delta.items() if k[0] in ("GET", "LIST")}
    assert reads == {}, f"read calls during decisions: {reads}"
    writes = sum(delta.values())
    record_timing("operator API requests per grant (writes only)", writes / len(names))
