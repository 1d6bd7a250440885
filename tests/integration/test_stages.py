"""Staged tasks against the real API server: one stage's access at a time (never two),
the same identity throughout, each stage a fresh decision, and every way a task ends
from a middle stage."""

from __future__ import annotations

import threading
import time

import pytest

from agent_access.kube import (
    ACCESS_POLICIES,
    AGENT_TASK_APPROVALS,
    AGENT_TASKS,
    SERVICE_ACCOUNTS,
    Resource,
)
from agent_access.kube import (
    PODS as PODS_RES,
)
from agent_access.staging import STAGE_STEPS

from .cluster import as_token, as_user, record_timing, status_code, wait_for

PODS = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]
CONFIG = [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list"]}]
SERVICES = [{"apiGroups": [""], "resources": ["services"], "verbs": ["list"]}]
SECRETS = [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["list"]}]


def scene(world, **policy):
    agents, target = world.namespace("stg-agents"), world.namespace("stg-target")
    world.service_account(agents, "bot")
    world.policy(target, "all", [(agents, "bot")], PODS + CONFIG + SERVICES, **policy)
    return agents, target


def staged(world, agents, target, name, rules=(PODS, CONFIG, SERVICES), ttl="1h", **spec):
    stages = []
    for i, r in enumerate(rules):
        stage = {"name": ("inspect", "deploy", "verify")[i], "access": [
            {"namespace": target, "rules": r}]}  # fmt: skip
        stages.append(stage)
    for name_, stage_ttl in (spec.pop("stage_ttls", None) or {}).items():
        next(s for s in stages if s["name"] == name_)["ttl"] = stage_ttl
    body = {"agent": "bot", "intent": f"staged {name}", "ttl": ttl, "stages": stages, **spec}
    world.kube.create(
        AGENT_TASKS,
        agents,
        {"apiVersion": "agentaccess.io/v1alpha1", "kind": "AgentTask",
         "metadata": {"name": name}, "spec": body},
    )  # fmt: skip
    return world.wait_phase(agents, name, {"Active", "Denied", "Pending"})


LISTED = {
    "pods": PODS_RES,
    "configmaps": Resource("/api/v1", "configmaps"),
    "services": Resource("/api/v1", "services"),
}


def can_list(client, ns, what) -> int:
    res = LISTED[what]
    return status_code(lambda: client.list(res, ns))


def advance(world, agents, name, stage):
    world.kube.merge_patch(AGENT_TASKS, agents, name, {"spec": {"stage": stage}})


def stage_live(world, agents, name, stage, phase="Active"):
    def check():
        t = world.get_task(agents, name)
        st = (t or {}).get("status") or {}
        return t if st.get("stage") == stage and st.get("phase") == phase else None

    return wait_for(check, 10, what=f"{name} in stage {stage} {phase}")


def test_three_stages_one_at_a_time_same_identity(world, operator):
    agents, target = scene(world)
    first = staged(world, agents, target, "release")
    assert first["status"]["phase"] == "Active" and first["status"]["stage"] == "inspect"
    token = world.token(first)
    identity = first["status"]["serviceAccountName"]
    client = as_token(world.kubeconfig, token)
    assert can_list(client, target, "pods") == 200
    assert can_list(client, target, "configmaps") == 403
    # while advancing, poll both stages' access: never both at once. Each answer is
    # placed in time by its request's start and end: every 200 for the old stage
    # ended before any 200 for the new one began.
    seen: list[tuple[str, float, float, int]] = []
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            for what in ("pods", "configmaps"):
                begun = time.monotonic()
                code = can_list(client, target, what)
                seen.append((what, begun, time.monotonic(), code))

    poller = threading.Thread(target=poll)
    poller.start()
    started = time.monotonic()
    advance(world, agents, "release", "deploy")
    wait_for(lambda: can_list(client, target, "pods") == 403, 5, 0.005, what="inspect refused")
    record_timing("stage advance -> previous stage refused", time.monotonic() - started)
    wait_for(lambda: can_list(client, target, "configmaps") == 200, 10, 0.01, what="deploy live")
    record_timing("stage advance -> next stage usable", time.monotonic() - started)
    stop.set()
    poller.join()
    old = [end for what, _, end, code in seen if what == "pods" and code == 200]
    new = [begun for what, begun, _, code in seen if what == "configmaps" and code == 200]
    assert old and new and max(old) <= min(new), "two stages' access were live at once"
    deploy = stage_live(world, agents, "release", "deploy")
    assert deploy["status"]["serviceAccountName"] == identity  # same identity, same token
    assert world.token(deploy) == token
    names = [(s["name"], s["phase"]) for s in deploy["status"]["stages"]]
    assert names == [("inspect", "Completed"), ("deploy", "Active")], names
    advance(world, agents, "release", "verify")
    done = stage_live(world, agents, "release", "verify")
    assert can_list(client, target, "services") == 200
    assert can_list(client, target, "configmaps") == 403
    # cancel in the last stage: all stages done
    world.kube.merge_patch(AGENT_TASKS, agents, "release", {"spec": {"cancel": True}})
    ended = world.wait_phase(agents, "release", "Completed")["status"]
    assert ended["reason"] == "StagesDone", ended
    wait_for(lambda: world.task_objects(done) == [], 10, what="everything removed")
    uid = first["metadata"]["uid"]
    lines = [x for x in operator.audit_lines() if x["task"]["uid"] == uid]
    granted = [x.get("stage") for x in lines if x["event"] == "granted"]
    assert granted == ["inspect", "deploy", "verify"], granted


def test_a_denied_middle_stage_ends_the_task(world, operator):
    agents, target = scene(world)
    task = staged(world, agents, target, "greedy", rules=(PODS, SECRETS, SERVICES))
    client = as_token(world.kubeconfig, world.token(task))
    advance(world, agents, "greedy", "deploy")
    ended = world.wait_phase(agents, "greedy", "Denied")["status"]
    assert ended["reason"] == "RuleNotAllowed" and "stage deploy" in ended["message"], ended
    assert can_list(client, target, "pods") in (401, 403)
    wait_for(lambda: world.task_objects(task) == [], 10, what="nothing of any stage left")
    assert [(s["name"], s["phase"]) for s in ended["stages"]][-1] == ("deploy", "Denied")


def test_skipping_a_stage_is_recorded(world, operator):
    agents, target = scene(world)
    staged(world, agents, target, "skip")
    advance(world, agents, "skip", "verify")
    task = stage_live(world, agents, "skip", "verify")
    phases = [(s["name"], s["phase"]) for s in task["status"]["stages"]]
    assert phases == [("inspect", "Completed"), ("deploy", "Skipped"), ("verify", "Active")]


def test_a_stage_ttl_ends_the_task_and_the_last_stage_ends_it_done(world, operator):
    agents, target = scene(world)
    staged(world, agents, target, "short", stage_ttls={"inspect": "2s"})
    ended = world.wait_phase(agents, "short", "Expired", timeout=10)["status"]
    assert ended["reason"] == "TTLExpired" and "stage inspect" in ended["message"], ended
    staged(world, agents, target, "last", rules=(PODS,), stage_ttls={"inspect": "2s"})
    ended = world.wait_phase(agents, "last", "Completed", timeout=10)["status"]
    assert ended["reason"] == "StagesDone", ended


def test_the_whole_task_ttl_caps_every_stage(world, operator):
    agents, target = scene(world)
    task = staged(world, agents, target, "capped", ttl="4s")
    assert task["status"]["expiresAt"] == task["status"]["taskExpiresAt"]
    advance(world, agents, "capped", "deploy")
    stage_live(world, agents, "capped", "deploy")
    ended = world.wait_phase(agents, "capped", "Expired", timeout=10)["status"]
    assert ended["reason"] == "TTLExpired" and "task's TTL" in ended["message"], ended


def test_triggers_end_the_task_from_a_middle_stage(world, operator):
    agents, target = scene(world)
    for name in ("t-cancel", "t-policy"):
        staged(world, agents, target, name)
        advance(world, agents, name, "deploy")
        stage_live(world, agents, name, "deploy")
    world.kube.merge_patch(AGENT_TASKS, agents, "t-cancel", {"spec": {"cancel": True}})
    assert world.wait_phase(agents, "t-cancel", "Cancelled")["status"]["reason"] == "Cancelled"
    world.kube.merge_patch(ACCESS_POLICIES, target, "all", {"spec": {"rules": PODS + SERVICES}})
    changed = world.wait_phase(agents, "t-policy", "Revoked")["status"]
    assert changed["reason"] == "PolicyChanged"
    world.kube.merge_patch(ACCESS_POLICIES, target, "all",
                           {"spec": {"rules": PODS + CONFIG + SERVICES}})  # fmt: skip
    staged(world, agents, target, "t-suspend")
    advance(world, agents, "t-suspend", "deploy")
    stage_live(world, agents, "t-suspend", "deploy")
    world.kube.merge_patch(
        SERVICE_ACCOUNTS, agents, "bot",
        {"metadata": {"annotations": {"agentaccess.io/suspended": "true"}}},
    )  # fmt: skip
    suspended = world.wait_phase(agents, "t-suspend", "Revoked")["status"]
    assert suspended["reason"] == "AgentSuspended"


def test_a_later_stage_can_require_approval(world, operator):
    agents, target = world.namespace("stg-agents"), world.namespace("stg-target")
    world.service_account(agents, "bot")
    world.policy(target, "read", [(agents, "bot")], PODS)
    alice = {"required": 1, "approvers": [{"kind": "User", "name": "alice"}]}
    world.policy(target, "write", [(agents, "bot")], CONFIG, approval=alice)
    approver_rbac(world, agents, "alice")
    task = staged(world, agents, target, "gated", rules=(PODS, CONFIG))
    assert task["status"]["phase"] == "Active"
    client = as_token(world.kubeconfig, world.token(task))
    advance(world, agents, "gated", "deploy")
    waiting = stage_live(world, agents, "gated", "deploy", phase="Pending")
    assert waiting["status"]["reason"] == "AwaitingApproval"
    assert can_list(client, target, "pods") == 403 and can_list(client, target, "configmaps") == 403
    as_user(world.kubeconfig, "alice").create(AGENT_TASK_APPROVALS, agents, {
        "apiVersion": "agentaccess.io/v1alpha1", "kind": "AgentTaskApproval",
        "metadata": {"name": "go"},
        "spec": {"taskName": "gated", "taskUID": task["metadata"]["uid"],
                 "decision": "Approve", "stage": "deploy"}})  # fmt: skip
    stage_live(world, agents, "gated", "deploy")
    assert can_list(client, target, "configmaps") == 200


@pytest.mark.parametrize("step", STAGE_STEPS)
def test_a_crash_between_stages_leaves_no_access_and_resumes(world, solo, step):
    """Killed at each step of moving on: the old stage's access is gone for good, and
    the new stage is live after the restart (never both)."""
    agents, target = scene(world)
    crashing = solo(env={"AGENT_ACCESS_CRASH_AT": step})
    task = staged(world, agents, target, "crashy")
    client = as_token(world.kubeconfig, world.token(task))
    advance(world, agents, "crashy", "deploy")
    wait_for(lambda: crashing.proc.poll() is not None, 10, what="the injected crash")
    assert can_list(client, target, "pods") == 403  # the old stage's access is gone
    solo()
    stage_live(world, agents, "crashy", "deploy")
    assert can_list(client, target, "configmaps") == 200
    assert can_list(client, target, "pods") == 403
    left = [o for o in world.task_objects(task) if o.endswith("-s1")]
    assert left == [], left


def test_kubectl_agentaccess_advance(world, operator):
    from .test_plugin import run

    agents, target = scene(world)
    staged(world, agents, target, "plugin-staged")
    kc = world.kubeconfig
    moved = run(kc, "advance", "plugin-staged", "deploy", "-n", agents, "--wait")
    assert moved.returncode == 0 and "stage deploy Active" in moved.stdout, moved
    back = run(kc, "advance", "plugin-staged", "inspect", "-n", agents)
    assert back.returncode == 2 and "may only move forward" in back.stderr, back
    shown = run(kc, "status", "plugin-staged", "-n", agents)
    assert "Stage:        deploy" in shown.stdout and "stage inspect: Completed" in shown.stdout


def test_pod_end_and_deletion_end_the_task_from_a_middle_stage(world, operator):
    agents, target = scene(world)
    world.pod(agents, "worker", "bot")
    world.set_pod_phase(agents, "worker", "Running")
    podded = staged(world, agents, target, "t-pod", podName="worker")
    assert podded["status"]["phase"] == "Active", podded["status"]
    advance(world, agents, "t-pod", "deploy")
    stage_live(world, agents, "t-pod", "deploy")
    world.set_pod_phase(agents, "worker", "Succeeded")
    done = world.wait_phase(agents, "t-pod", "Completed")["status"]
    assert done["reason"] == "PodSucceeded", done
    wait_for(lambda: world.task_objects(podded) == [], 10, what="the pod's task cleaned up")
    task = staged(world, agents, target, "t-delete")
    client = as_token(world.kubeconfig, world.token(task))
    advance(world, agents, "t-delete", "deploy")
    stage_live(world, agents, "t-delete", "deploy")
    world.kube.delete(AGENT_TASKS, agents, "t-delete")
    wait_for(lambda: can_list(client, target, "configmaps") in (401, 403), 5, 0.01,
             what="the deleted task's stage refused")  # fmt: skip
    wait_for(lambda: world.task_objects(task) == [], 10, what="the deleted task cleaned up")


def approver_rbac(world, agents, *users):
    world.allow(agents, "approver", list(users), ["agenttaskapprovals"], ["create"])


def approve(world, agents, task, user, stage=None):
    spec = {"taskName": task["metadata"]["name"], "taskUID": task["metadata"]["uid"],
            "decision": "Approve"}  # fmt: skip
    if stage:
        spec["stage"] = stage
    as_user(world.kubeconfig, user).create(AGENT_TASK_APPROVALS, agents, {
        "apiVersion": "agentaccess.io/v1alpha1", "kind": "AgentTaskApproval",
        "metadata": {"generateName": "ok-"}, "spec": spec})  # fmt: skip


def test_an_approval_for_one_stage_never_counts_for_the_next(world, operator):
    agents, target = world.namespace("stg-agents"), world.namespace("stg-target")
    world.service_account(agents, "bot")
    two = {"required": 2, "approvers": [{"kind": "User", "name": "alice"},
                                        {"kind": "User", "name": "bob"}]}  # fmt: skip
    world.policy(target, "gated", [(agents, "bot")], PODS + CONFIG, approval=two)
    approver_rbac(world, agents, "alice", "bob")
    task = staged(world, agents, target, "waits", rules=(PODS, CONFIG))
    assert task["status"]["reason"] == "AwaitingApproval"
    approve(world, agents, task, "alice")  # for inspect: 1 of 2
    wait_for(lambda: "1 of 2" in world.get_task(agents, "waits")["status"]["message"], 10,
             what="alice counted for inspect")  # fmt: skip
    advance(world, agents, "waits", "deploy")  # still no identity: inspect never issued
    waiting = stage_live(world, agents, "waits", "deploy", phase="Pending")
    # approvals carry whole seconds: one made in the second deploy began waiting cannot
    # be told from one made before, and does not count for it (docs/stages.md)
    time.sleep(1.1)
    approve(world, agents, task, "bob")  # for deploy: alice's was for inspect
    wait_for(lambda: len(world.get_task(agents, "waits")["status"].get("approvals") or []) == 2,
             10, what="both decisions listed")  # fmt: skip
    status = world.get_task(agents, "waits")["status"]
    assert status["phase"] == "Pending" and "1 of 2" in status["message"], status
    alice = next(a for a in status["approvals"] if a["approver"]["username"] == "alice")
    assert alice["counted"] is False and "before this stage" in alice["reason"]
    approve(world, agents, task, "alice", stage="deploy")
    stage_live(world, agents, "waits", "deploy")
    assert waiting["metadata"]["uid"] == task["metadata"]["uid"]


def test_a_later_stage_respects_max_active_tasks(world, operator):
    agents, target = world.namespace("stg-agents"), world.namespace("stg-target")
    world.service_account(agents, "bot")
    world.policy(target, "reads", [(agents, "bot")], PODS, maxActiveTasks=1)
    one = {"required": 1, "approvers": [{"kind": "User", "name": "alice"}]}
    world.policy(target, "gated", [(agents, "bot")], CONFIG, approval=one)
    approver_rbac(world, agents, "alice")
    task = staged(world, agents, target, "first", rules=(CONFIG, PODS))
    approve(world, agents, task, "alice")
    stage_live(world, agents, "first", "inspect")
    world.task(agents, "other", "bot", [{"namespace": target, "rules": PODS}])
    assert world.wait_phase(agents, "other", "Active")["status"]["policies"] == [f"{target}/reads"]
    advance(world, agents, "first", "deploy")  # the one slot under `reads` is taken
    ended = world.wait_phase(agents, "first", "Denied")["status"]
    assert ended["reason"] == "LimitExceeded" and "stage deploy" in ended["message"], ended
