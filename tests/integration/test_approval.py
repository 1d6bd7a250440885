"""Human approval against the real API server: tasks wait Pending/AwaitingApproval with
nothing issued until enough eligible approvers decide; self-approval is refused at
admission; the approver is stamped from the API server's record; one eligible Deny
ends a task; no decision within the timeout expires it; the wait survives restarts."""

from __future__ import annotations

import time
import uuid

import pytest

from agent_access.kube import AGENT_TASK_APPROVALS, KubeError, Resource

from .cluster import as_token, as_user, list_pods_status, wait_for

READ = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]
CLUSTER_ROLES = Resource("/apis/rbac.authorization.k8s.io/v1", "clusterroles", namespaced=False)
ROLE_BINDINGS = Resource("/apis/rbac.authorization.k8s.io/v1", "rolebindings")
ROLES = Resource("/apis/rbac.authorization.k8s.io/v1", "roles")
APPROVERS = [
    {"kind": "User", "name": "alice"},
    {"kind": "Group", "name": "payments-oncall"},
    {"kind": "ServiceAccount", "namespace": "ops", "name": "approver-bot"},
]


@pytest.fixture(scope="module")
def approver_role(kubeconfig):
    """What docs/approval.md tells platform teams to give approvers."""
    from .cluster import admin

    kube = admin(kubeconfig)
    name = "test-agentaccess-approver"
    if kube.get(CLUSTER_ROLES, None, name) is None:
        kube.create(
            CLUSTER_ROLES,
            None,
            {
                "metadata": {"name": name},
                "rules": [
                    {
                        "apiGroups": ["agentaccess.io"],
                        "resources": ["agenttasks"],
                        "verbs": ["get", "list", "watch"],
                    },
                    {
                        "apiGroups": ["agentaccess.io"],
                        "resources": ["agenttaskapprovals"],
                        "verbs": ["get", "list", "watch", "create"],
                    },
                ],
            },
        )
    return name


def scene(world, approver_role, required=2, timeout="1h", **policy):
    agents, target = world.namespace("appr-agents"), world.namespace("appr-target")
    world.service_account(agents, "bot")
    world.policy(
        target,
        "gated",
        [(agents, "bot")],
        READ,
        approval={"required": required, "approvers": APPROVERS, "timeout": timeout},
        **policy,
    )
    # everyone authenticated may try (RBAC decides who may even try; the policy who counts)
    world.kube.create(
        ROLE_BINDINGS,
        agents,
        {
            "metadata": {"name": "approvers"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": approver_role,
            },
            "subjects": [
                {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "Group",
                    "name": "system:authenticated",
                }
            ],
        },
    )
    return agents, target


def decide(world, task, decision, user, groups=(), **spec):
    """An AgentTaskApproval made by `user` (impersonated: admission sees that identity)."""
    client = as_user(world.kubeconfig, user, groups)
    meta = task["metadata"]
    body = {
        "apiVersion": "agentaccess.io/v1alpha1",
        "kind": "AgentTaskApproval",
        "metadata": {"generateName": f"{meta['name']}-"},
        "spec": {
            "taskName": meta["name"],
            "taskUID": meta["uid"],
            "decision": decision,
            "comment": f"{decision} from {user}",
            **spec,
        },
    }
    return client.create(AGENT_TASK_APPROVALS, meta["namespace"], body)


def refused(call) -> KubeError:
    with pytest.raises(KubeError) as info:
        call()
    return info.value


def approvals(world, ns, name):
    return (world.get_task(ns, name).get("status") or {}).get("approvals") or []


def test_two_approvers_then_granted_nothing_issued_before(world, operator, approver_role):
    agents, target = scene(world, approver_role)
    task = world.task(agents, "deploy", "bot", [{"namespace": target, "rules": READ}])
    waiting = world.wait_phase(agents, "deploy", "Pending")
    wait_for(
        lambda: (
            (world.get_task(agents, "deploy")["status"] or {}).get("reason") == "AwaitingApproval"
        ),
        what="AwaitingApproval",
    )
    waiting = world.get_task(agents, "deploy")
    assert "0 of 2" in waiting["status"]["message"], waiting["status"]
    assert world.task_objects(task) == []  # nothing issued while waiting
    assert "tokenSecretName" not in waiting["status"]

    # an identity no policy lists: recorded, not counted
    decide(world, task, "Approve", "eve")
    # one eligible approver; the same one again does not count twice
    decide(world, task, "Approve", "alice")
    decide(world, task, "Approve", "alice")
    wait_for(lambda: len(approvals(world, agents, "deploy")) == 3, what="3 decisions listed")
    status = world.get_task(agents, "deploy")["status"]
    assert status["phase"] == "Pending" and "1 of 2" in status["message"], status
    # (listed in the order made; within one second, by name)
    (eve,) = [a for a in status["approvals"] if a["approver"]["username"] == "eve"]
    assert eve["counted"] is False and "not an eligible approver" in eve["reason"]
    alice, again = sorted(
        (a for a in status["approvals"] if a["approver"]["username"] == "alice"),
        key=lambda a: not a["counted"],
    )
    assert alice["counted"] is True and alice["comment"] == "Approve from alice"
    assert again["counted"] is False and "duplicate" in again["reason"]
    assert world.task_objects(task) == []

    # a member of the approvers' group, trying to pass as alice: stamped as himself
    decide(world, task, "Approve", "bob", ("payments-oncall",), approver={"username": "alice"})
    active = world.wait_phase(agents, "deploy", "Active")
    names = [a["approver"]["username"] for a in active["status"]["approvals"]]
    assert sorted(names) == ["alice", "alice", "bob", "eve"], names  # nobody passed as alice
    (bob,) = [a for a in active["status"]["approvals"] if a["approver"]["username"] == "bob"]
    assert bob["counted"] is True and "payments-oncall" in bob["approver"]["groups"]
    client = as_token(world.kubeconfig, world.token(active))
    assert list_pods_status(client, target) == 200
    reasons = [e["reason"] for e in world.events(agents, "deploy")]
    for reason in ("AwaitingApproval", "Approved", "ApprovalNotCounted", "PolicyAllowed"):
        assert reason in reasons, reasons
    lines = [
        line for line in operator.audit_lines() if line["task"]["uid"] == task["metadata"]["uid"]
    ]
    events = [line["event"] for line in lines]
    assert events[0] == "pending" and events[-1] == "granted", events
    assert events.count("approval") == 4
    assert sorted(a["approver"]["username"] for a in lines[-1]["approvals"]) == sorted(names)


def test_self_approval_is_refused_at_admission(world, operator, approver_role):
    agents, target = scene(world, approver_role, required=1)
    world.service_account(agents, "helper")
    # carol may create tasks here, and is in the approvers' group too
    world.allow(agents, "requester", ["carol"], ["agenttasks"], ["create", "get"])
    carol = as_user(world.kubeconfig, "carol", ("payments-oncall",))
    from agent_access.kube import AGENT_TASKS

    task = carol.create(
        AGENT_TASKS,
        agents,
        {
            "apiVersion": "agentaccess.io/v1alpha1",
            "kind": "AgentTask",
            "metadata": {"name": "mine"},
            "spec": {
                "agent": "bot",
                "intent": "carol's task",
                "access": [{"namespace": target, "rules": READ}],
            },
        },
    )
    world.wait_phase(agents, "mine", "Pending")
    by_requester = refused(lambda: decide(world, task, "Approve", "carol", ("payments-oncall",)))
    assert by_requester.status == 403
    assert "self-approval is refused: you created this AgentTask" in by_requester.reason
    by_agent = refused(
        lambda: decide(world, task, "Approve", f"system:serviceaccount:{agents}:bot")
    )
    assert by_agent.status == 403 and "an agent never approves its own" in by_agent.reason
    per_task = refused(
        lambda: decide(world, task, "Approve", f"system:serviceaccount:{agents}:aat-x-1")
    )
    assert per_task.status == 403 and "per-task identity" in per_task.reason
    # a name that does not match the UID is refused too (no approving one task by
    # naming another)
    other = world.task(agents, "other", "bot", [{"namespace": target, "rules": READ}])
    wrong = refused(lambda: decide(world, task, "Approve", "alice", taskName="other"))
    assert wrong.status in (403, 422) and "does not name" in wrong.reason
    time.sleep(0.5)
    assert world.get_task(agents, "mine")["status"]["phase"] == "Pending"
    assert approvals(world, agents, "mine") == []
    # another eligible approver decides: granted
    decide(world, task, "Approve", "alice")
    world.wait_phase(agents, "mine", "Active")
    assert world.get_task(agents, "other")["status"]["phase"] == "Pending"
    assert other["metadata"]["uid"] != task["metadata"]["uid"]


def test_an_approval_is_immutable_and_bound_to_one_task_uid(world, operator, approver_role):
    agents, target = scene(world, approver_role, required=1)
    task = world.task(agents, "once", "bot", [{"namespace": target, "rules": READ}])
    world.wait_phase(agents, "once", "Pending")
    made = decide(world, task, "Deny", "eve")  # not eligible: listed, not counted
    change = refused(
        lambda: world.kube.merge_patch(
            AGENT_TASK_APPROVALS,
            agents,
            made["metadata"]["name"],
            {"spec": {"decision": "Approve", "approver": {"username": "alice"}}},
        )
    )
    assert change.status == 422 and "immutable" in change.reason
    # an approval made out for another task's UID (e.g. an earlier task of the same name)
    fake = dict(task, metadata=dict(task["metadata"], uid=str(uuid.uuid4())))
    decide(world, fake, "Approve", "alice")
    wait_for(lambda: len(approvals(world, agents, "once")) == 1, what="eve's deny listed")
    time.sleep(0.5)
    status = world.get_task(agents, "once")["status"]
    assert status["phase"] == "Pending", status
    assert [a["approver"]["username"] for a in status["approvals"]] == ["eve"]


def test_one_eligible_denial_ends_the_task(world, operator, approver_role):
    agents, target = scene(world, approver_role)
    task = world.task(agents, "risky", "bot", [{"namespace": target, "rules": READ}])
    world.wait_phase(agents, "risky", "Pending")
    decide(world, task, "Approve", "alice")
    decide(world, task, "Deny", "system:serviceaccount:ops:approver-bot")
    done = world.wait_phase(agents, "risky", "Denied")
    assert done["status"]["reason"] == "ApprovalDenied"
    assert "denied by system:serviceaccount:ops:approver-bot" in done["status"]["message"]
    assert world.task_objects(task) == []
    # later decisions change nothing: terminal
    decide(world, task, "Approve", "bob", ("payments-oncall",))
    time.sleep(0.5)
    assert world.get_task(agents, "risky")["status"]["phase"] == "Denied"


def test_no_decision_within_the_timeout_expires_the_task(world, operator, approver_role):
    agents, target = scene(world, approver_role, timeout="3s")
    task = world.task(agents, "slow", "bot", [{"namespace": target, "rules": READ}])
    world.wait_phase(agents, "slow", "Pending")
    decide(world, task, "Approve", "alice")
    done = world.wait_phase(agents, "slow", "Expired", timeout=10)
    assert done["status"]["reason"] == "ApprovalTimeout", done["status"]
    assert world.task_objects(task) == []
    assert [a["counted"] for a in done["status"]["approvals"]] == [True]


def test_a_policy_change_while_waiting_decides_again(world, operator, approver_role):
    agents, target = scene(world, approver_role)
    world.task(agents, "w1", "bot", [{"namespace": target, "rules": READ}])
    world.wait_phase(agents, "w1", "Pending")
    from agent_access.kube import ACCESS_POLICIES

    # the platform team drops the approval requirement: granted at once
    world.kube.merge_patch(ACCESS_POLICIES, target, "gated", {"spec": {"approval": None}})
    world.wait_phase(agents, "w1", "Active")
    world.kube.merge_patch(
        ACCESS_POLICIES,
        target,
        "gated",
        {"spec": {"approval": {"required": 1, "approvers": APPROVERS}}},
    )
    world.task(agents, "w2", "bot", [{"namespace": target, "rules": READ}])
    world.wait_phase(agents, "w2", "Pending")
    # ... or deletes the policy: the waiting task is denied, not left waiting
    world.kube.delete(ACCESS_POLICIES, target, "gated")
    done = world.wait_phase(agents, "w2", "Denied")
    assert done["status"]["reason"] == "NoMatchingPolicy"


def test_the_wait_survives_an_operator_restart(world, solo, approver_role):
    first = solo()
    agents, target = scene(world, approver_role)
    quick_agents, quick_target = scene(world, approver_role, required=1, timeout="4s")
    task = world.task(agents, "long", "bot", [{"namespace": target, "rules": READ}])
    quick = world.task(quick_agents, "quick", "bot", [{"namespace": quick_target, "rules": READ}])
    world.wait_phase(agents, "long", "Pending")
    world.wait_phase(quick_agents, "quick", "Pending")
    decide(world, task, "Approve", "alice")
    wait_for(lambda: len(approvals(world, agents, "long")) == 1, what="alice's approval listed")
    first.kill()
    # while no operator runs: the second approval, and the other task's timeout passes
    decide(world, task, "Approve", "system:serviceaccount:ops:approver-bot")
    created = time.monotonic()
    time.sleep(5)
    solo()
    active = world.wait_phase(agents, "long", "Active", timeout=20)
    assert [a["counted"] for a in active["status"]["approvals"]] == [True, True]
    expired = world.wait_phase(quick_agents, "quick", "Expired", timeout=20)
    assert expired["status"]["reason"] == "ApprovalTimeout"
    assert world.task_objects(quick) == []
    assert time.monotonic() - created < 30
