"""The operator killed with SIGKILL while grants are live: after restart, a grant
that expired meanwhile is revoked within 2 s, and orphans are removed."""

from __future__ import annotations

import time

from agent_access.kube import AGENT_TASKS

from .cluster import as_token, list_pods_status, poll_status, record_timing, unique

READ_PODS = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]


def test_sigkill_expiry_and_orphans(world, operator):
    agents = world.namespace("agents")
    target = world.namespace("target")
    world.service_account(agents, "bot")
    world.policy(target, "read", [(agents, "bot")], READ_PODS)
    names = {k: unique(k) for k in ("short", "long", "orphan")}
    world.task(agents, names["short"], "bot", [{"namespace": target, "rules": READ_PODS}], ttl="4s")
    for key in ("long", "orphan"):
        world.task(agents, names[key], "bot", [{"namespace": target, "rules": READ_PODS}])
    tasks = {k: world.wait_phase(agents, n, "Active") for k, n in names.items()}
    clients = {k: as_token(world.kubeconfig, world.token(t)) for k, t in tasks.items()}
    assert all(list_pods_status(c, target) == 200 for c in clients.values())

    operator.kill()
    try:
        # While it is down: an orphan appears (its task is deleted without the operator)
        world.kube.merge_patch(
            AGENT_TASKS, agents, names["orphan"], {"metadata": {"finalizers": None}}
        )
        world.kube.delete(AGENT_TASKS, agents, names["orphan"])
        time.sleep(5)  # and the short task expires
        assert list_pods_status(clients["short"], target) == 200  # nobody revoked it yet
    finally:
        started = time.monotonic()
        operator.start()
    poll_status(lambda: list_pods_status(clients["short"], target), {401, 403}, 10)
    record_timing("restart: expired while down -> 403 (incl. start-up)", time.monotonic() - started)
    # measured from spawning the process: ~1 s of it is importing the Kubernetes client
    assert time.monotonic() - started < 2.0
    assert world.wait_phase(agents, names["short"], "Expired")["status"]["reason"] == "TTLExpired"
    assert world.task_objects(tasks["short"]) == []
    assert world.task_objects(tasks["orphan"]) == []
    assert list_pods_status(clients["orphan"], target) in (401, 403)
    # the long task survived the restart untouched, and its timer is armed again
    assert world.get_task(agents, names["long"])["status"]["phase"] == "Active"
    assert list_pods_status(clients["long"], target) == 200
