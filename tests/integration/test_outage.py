"""The API server restarted while grants are live, one expiring during the outage:
once it is back the expired grant is revoked within 2 s; the operator neither
crashes nor loses track of the others."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from .cluster import (
    ROOT,
    as_token,
    list_pods_status,
    poll_status,
    record_timing,
    unique,
    wait_for_admission,
)

READ = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]


@pytest.fixture
def own_controlplane(kubeconfig):
    import sys

    sys.path.insert(0, str(ROOT / "hack"))
    import controlplane

    state = controlplane.read_state()
    server = json.loads(Path(kubeconfig).read_text())["clusters"][0]["cluster"]["server"]
    if not state or state["server"] != server:
        pytest.fail(
            "this test restarts kube-apiserver: run it on the project's own control "
            "plane (make controlplane-up, or no KUBECONFIG)"
        )
    return controlplane, state


def test_apiserver_outage(world, operator, own_controlplane):
    controlplane, state = own_controlplane
    agents = world.namespace("outage-agents")
    target = world.namespace("outage-target")
    world.service_account(agents, "bot")
    world.policy(target, "read", [(agents, "bot")], READ)
    names = {"short": unique("short"), "long": unique("long")}
    world.task(agents, names["short"], "bot", [{"namespace": target, "rules": READ}], ttl="5s")
    world.task(agents, names["long"], "bot", [{"namespace": target, "rules": READ}])
    tasks = {k: world.wait_phase(agents, n, "Active") for k, n in names.items()}
    clients = {k: as_token(world.kubeconfig, world.token(t)) for k, t in tasks.items()}
    from agent_access.runtime import parse_time

    expires = parse_time(tasks["short"]["status"]["expiresAt"]).timestamp()

    controlplane.stop_apiserver(state)
    try:
        time.sleep(max(0.0, expires - time.time()) + 3)  # it expires during the outage
    finally:
        controlplane.start_apiserver(state)
    back = time.monotonic()
    poll_status(lambda: list_pods_status(clients["short"], target), {401, 403}, 10)
    record_timing("outage: API back -> expired grant refused", time.monotonic() - back)
    assert time.monotonic() - back < 2.0
    assert operator.proc.poll() is None, "the operator died during the outage"
    final = world.wait_phase(agents, names["short"], "Expired", timeout=10)
    assert final["status"]["reason"] == "TTLExpired"
    assert world.task_objects(tasks["short"]) == []
    # the live grant survived, and the operator still reacts to new work
    assert list_pods_status(clients["long"], target) == 200
    # the API server's MutatingAdmissionPolicy on AgentTasks learns the CRD's type anew
    # after a restart (503 until then): measured, and waited for
    started = time.monotonic()
    wait_for_admission(world.kube)
    record_timing("outage: API back -> AgentTask creates admitted", time.monotonic() - started)
    name = unique("after")
    world.task(agents, name, "bot", [{"namespace": target, "rules": READ}])
    world.wait_phase(agents, name, "Active", timeout=15)
