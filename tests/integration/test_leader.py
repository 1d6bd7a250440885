"""Two operator instances against one cluster: only the Lease holder acts; kill it and
the other takes over within a bound (lease duration + one retry + start-up)."""

from __future__ import annotations

import http.client
import time
import urllib.request

from .cluster import record_timing, unique, wait_for

READ = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]
LEASE_SECONDS = 3
RETRY_SECONDS = 0.5


def role(op) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{op.port}/readyz", timeout=1) as r:
            return r.read().decode().strip()
    except (OSError, http.client.HTTPException):  # e.g. cut short by a replica exiting
        return "down"


def elect_args(namespace: str, lease_id: str) -> list[str]:
    return [
        "--leader-elect",
        "--leader-election-namespace",
        namespace,
        "--leader-election-id",
        lease_id,
        "--lease-duration",
        str(LEASE_SECONDS),
        "--lease-retry",
        str(RETRY_SECONDS),
    ]


def issued(op) -> float:
    for line in op.metrics().splitlines():
        if line.startswith("agentaccess_grants_issued_total "):
            return float(line.split()[1])
    return 0.0


def two_replicas(world, solo):
    """Two instances on one Lease: the first leads, the second stands by."""
    args = elect_args(world.namespace("lease"), unique("aao"))
    first = solo(args=args)
    wait_for(lambda: role(first) == "ok", 10, what="first instance leads")
    second = solo(args=args)
    assert role(second) == "standby"
    return args, first, second


def test_only_the_leader_acts_and_a_standby_takes_over(world, solo):
    _, first, second = two_replicas(world, solo)

    agents = world.namespace("leader-agents")
    target = world.namespace("leader-target")
    world.service_account(agents, "bot")
    world.policy(target, "read", [(agents, "bot")], READ)
    before = unique("before")
    world.task(agents, before, "bot", [{"namespace": target, "rules": READ}], ttl="8s")
    world.wait_phase(agents, before, "Active")
    # only one acts (the counter moves just after status is written: wait for it)
    wait_for(lambda: issued(first) >= 1, 5, what="the leader counted its grant")
    assert issued(second) == 0
    assert not second.audit_lines()

    killed = time.monotonic()
    first.kill()
    wait_for(lambda: role(second) == "ok", LEASE_SECONDS + 10, 0.05, what="takeover")
    takeover = time.monotonic() - killed
    record_timing("leader killed -> standby leads", takeover)
    assert takeover < LEASE_SECONDS + 2 * RETRY_SECONDS + 5

    after = unique("after")
    world.task(agents, after, "bot", [{"namespace": target, "rules": READ}])
    world.wait_phase(agents, after, "Active", timeout=10)
    # the grant issued by the dead leader still ends on time, by the new one
    assert (
        world.wait_phase(agents, before, "Expired", timeout=15)["status"]["reason"] == "TTLExpired"
    )


def test_an_edited_lease_does_not_freeze_the_replicas(world, solo):
    """Someone writes the Lease: another holder, renewTime a year ahead, a huge
    leaseDurationSeconds. The leader steps down; a standby leads again within one
    lease of its own (local time), instead of waiting for the written time."""
    from datetime import UTC, datetime, timedelta

    from agent_access.kube import Conflict
    from agent_access.leader import LEASES

    lease_ns = world.namespace("lease")
    lease_id = unique("aao")
    args = elect_args(lease_ns, lease_id)
    first = solo(args=args)
    wait_for(lambda: role(first) == "ok", 10, what="first instance leads")
    second = solo(args=args)
    future = (datetime.now(UTC) + timedelta(days=365)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    for _ in range(20):  # the leader renews meanwhile: read, edit, write until it sticks
        lease = world.kube.get(LEASES, lease_ns, lease_id)
        lease["spec"].update(
            holderIdentity="attacker",
            renewTime=future,
            acquireTime=future,
            leaseDurationSeconds=10**9,
        )
        edited = time.monotonic()
        try:
            world.kube.request(
                "PUT", LEASES.path(lease_ns, lease_id), body=lease, resource="leases"
            )
            break
        except Conflict:
            continue
    else:
        raise AssertionError("the Lease could not be edited: the test would prove nothing")
    wait_for(
        lambda: (
            "ok" in (role(first), role(second))
            and world.kube.get(LEASES, lease_ns, lease_id)["spec"]["holderIdentity"] != "attacker"
        ),
        LEASE_SECONDS * 3 + 10,
        0.1,
        what="a replica leads again",
    )
    record_timing("edited lease -> a replica leads again", time.monotonic() - edited)
    assert time.monotonic() - edited < 2 * LEASE_SECONDS + 4 * RETRY_SECONDS + 5


def test_sigterm_stops_a_standby_at_once_and_a_leader_hands_over(world, solo):
    """A standby told to stop does not linger (nor grab the Lease on its way out); a
    leader told to stop finishes its work, then gives the Lease up, so a standby leads
    well before the Lease would have expired."""
    args, first, second = two_replicas(world, solo)
    started = time.monotonic()
    second.stop()  # SIGTERM
    assert time.monotonic() - started < 3
    assert role(first) == "ok"

    third = solo(args=args)
    assert role(third) == "standby"
    started = time.monotonic()
    first.stop()  # SIGTERM: releases the Lease once idle
    wait_for(lambda: role(third) == "ok", LEASE_SECONDS + 10, 0.05, what="handover")
    handover = time.monotonic() - started
    record_timing("leader SIGTERM -> standby leads", handover)
    assert handover < LEASE_SECONDS, "the Lease was not given up: it had to expire"


def test_a_leader_whose_work_outlives_the_grace_exits_without_giving_the_lease_up(
    world, solo, kubeconfig, tmp_path
):
    """SIGTERM while a revocation is stuck (its RoleBinding DELETE held by a proxy):
    the leader waits 10 s for it, then exits at once (status 1) and leaves the Lease
    to expire, so no standby acts beside work still running; the next leader finishes
    the revocation."""
    from agent_access.kube import AGENT_TASKS
    from agent_access.leader import LEASES

    from .faultproxy import FaultProxy

    proxy = FaultProxy(kubeconfig, tmp_path, rate=0.0)
    lease_ns = world.namespace("lease")
    lease_id = unique("aao")
    args = elect_args(lease_ns, lease_id)
    leader = solo(config=proxy.kubeconfig, args=args)
    wait_for(lambda: role(leader) == "ok", 10, what="the instance leads")
    agents = world.namespace("grace-agents")
    target = world.namespace("grace-target")
    world.service_account(agents, "bot")
    world.policy(target, "read", [(agents, "bot")], READ)
    name = unique("stuck")
    world.task(agents, name, "bot", [{"namespace": target, "rules": READ}])
    world.wait_phase(agents, name, "Active")
    proxy.delays[("DELETE", "/rolebindings/")] = 30
    world.kube.merge_patch(AGENT_TASKS, agents, name, {"spec": {"cancel": True}})
    time.sleep(1)  # the revocation now waits on its RoleBinding DELETE
    started = time.monotonic()
    leader.stop()  # SIGTERM
    took = time.monotonic() - started
    assert leader.proc.returncode == 1, leader.proc.returncode
    assert 9 < took < 14, took
    lease = world.kube.get(LEASES, lease_ns, lease_id)
    assert lease["spec"].get("holderIdentity"), "the Lease was given up with work running"
    proxy.delays.clear()
    successor = solo(args=args)
    wait_for(lambda: role(successor) == "ok", LEASE_SECONDS + 15, 0.1, what="a new leader")
    assert world.wait_phase(agents, name, "Cancelled", timeout=15)["status"]["reason"] == (
        "Cancelled"
    )
