"""`kubectl agentaccess` end to end: the installed executable, run as a user would (as a
subprocess, through kubectl's plugin lookup too), against the real API server and the
operator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from agent_access.kube import AGENT_TASKS

BIN = Path(sys.executable).parent
READ_PODS = "get,list:pods"


def run(kubeconfig: str, *args: str, via_kubectl: bool = False) -> subprocess.CompletedProcess:
    cmd = (
        [str(BIN / "kubectl"), "agentaccess"] if via_kubectl else [str(BIN / "kubectl-agentaccess")]
    )
    env = dict(os.environ, KUBECONFIG=kubeconfig, PATH=f"{BIN}:{os.environ['PATH']}")
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=90)


def scene(world):
    agents, target = world.namespace("plugin-agents"), world.namespace("plugin-target")
    world.service_account(agents, "bot")
    world.policy(
        target,
        "read",
        [(agents, "bot")],
        [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}],
    )
    return agents, target


def test_request_wait_list_status_cancel_and_audit(world, operator):
    agents, target = scene(world)
    kc = world.kubeconfig
    got = run(
        kc, "request", "fix-it", "-n", agents, "--agent", "bot", "--intent", "read pods",
        "--rule", f"{target}:{READ_PODS}", "--ttl", "10m", "--wait",
    )  # fmt: skip
    assert got.returncode == 0, got.stderr
    task = world.get_task(agents, "fix-it")
    assert "agenttask/fix-it Active: PolicyAllowed" in got.stdout
    assert f"token Secret: {task['status']['tokenSecretName']}" in got.stdout
    assert task["spec"]["access"] == [
        {
            "namespace": target,
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}],
        }
    ]
    listed = run(kc, "list", "-n", agents, via_kubectl=True)  # kubectl finds the plugin
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()
    assert header.split() == ["NAME", "AGENT", "PHASE", "REASON", "REQUESTER", "EXPIRES", "AGE"]
    assert row.split()[:5] == ["fix-it", "bot", "Active", "PolicyAllowed", "admin"]
    every = run(kc, "list", "-A")
    assert every.stdout.splitlines()[0].split()[0] == "NAMESPACE"
    assert any(line.split()[:2] == [agents, "fix-it"] for line in every.stdout.splitlines())
    as_json = json.loads(run(kc, "status", "fix-it", "-n", agents, "-o", "json").stdout)
    assert as_json["metadata"]["uid"] == task["metadata"]["uid"]
    as_yaml = yaml.safe_load(run(kc, "status", "fix-it", "-n", agents, "-o", "yaml").stdout)
    assert as_yaml["status"]["phase"] == "Active"
    described = run(kc, "status", "fix-it", "-n", agents).stdout
    assert "Phase:        Active" in described and "Intent:       read pods" in described
    cancelled = run(kc, "cancel", "fix-it", "-n", agents)
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
    world.wait_phase(agents, "fix-it", "Cancelled")
    again = run(kc, "cancel", "fix-it", "-n", agents)
    assert again.returncode == 1 and "already ended: Cancelled" in again.stderr
    audited = run(kc, "audit", "fix-it", "-n", agents)
    assert audited.returncode == 0, audited.stderr
    assert "granted" in audited.stdout and "Cancelled" in audited.stdout


def test_exit_codes_scripts_can_use(world, operator):
    agents, target = scene(world)
    kc = world.kubeconfig
    denied = run(
        kc, "request", "too-much", "-n", agents, "--agent", "bot", "--intent", "x",
        "--rule", f"{target}:delete:pods", "--wait", "--timeout", "30",
    )  # fmt: skip
    assert denied.returncode == 1 and "Denied" in denied.stdout, denied
    missing = run(kc, "status", "nope", "-n", agents)
    assert missing.returncode == 1 and "not found" in missing.stderr
    bad = run(kc, "request", "x", "-n", agents, "--agent", "bot", "--intent", "x", "--rule", "oops")
    assert bad.returncode == 2 and "NAMESPACE:VERBS:RESOURCES" in bad.stderr
    refused = run(
        kc, "request", "Bad_Name", "-n", agents, "--agent", "bot", "--intent", "x",
        "--rule", f"{target}:{READ_PODS}",
    )  # fmt: skip
    assert refused.returncode == 2 and "422" in refused.stderr
    nothing = run(kc, "list", "-n", world.namespace("empty"))
    assert nothing.returncode == 0 and "No AgentTasks found" in nothing.stderr
    assert world.kube.get(AGENT_TASKS, agents, "Bad_Name") is None


def test_help_has_examples():
    out = subprocess.run(
        [str(BIN / "kubectl-agentaccess"), "--help"], capture_output=True, text=True
    ).stdout
    assert "examples:" in out and "--wait" in out and "exit codes" in out


def test_approve_deny_suspend_resume(world, operator):
    """approve/deny make AgentTaskApprovals as the caller (self-approval refused with the
    API server's message, exit 2); suspend/resume mark the agent's ServiceAccount."""
    from agent_access.kube import AGENT_TASK_APPROVALS, SERVICE_ACCOUNTS

    from .cluster import as_user

    agents, target = world.namespace("plugin-agents"), world.namespace("plugin-target")
    world.service_account(agents, "bot")
    rules = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]
    approval = {"required": 1, "approvers": [{"kind": "User", "name": "admin"}]}
    world.policy(target, "gated", [(agents, "bot")], rules, approval=approval)
    world.allow(agents, "requester", ["carol"], ["agenttasks"], ["create", "get"])
    kc = world.kubeconfig
    carol = as_user(kc, "carol")
    body = {
        "apiVersion": "agentaccess.io/v1alpha1",
        "kind": "AgentTask",
        "metadata": {"name": "carols"},
        "spec": {"agent": "bot", "intent": "CHG-1: read pods",
                 "access": [{"namespace": target, "rules": rules}]},
    }  # fmt: skip
    carols = carol.create(AGENT_TASKS, agents, body)
    world.wait_phase(agents, "carols", "Pending")
    uid = carols["metadata"]["uid"]
    # admin asks for one too: they may not approve their own
    mine = run(
        kc, "request", "mine", "-n", agents, "--agent", "bot", "--intent", "x",
        "--rule", f"{target}:{READ_PODS}", "--wait", "--timeout", "3",
    )  # fmt: skip
    assert mine.returncode == 1 and "AwaitingApproval" in mine.stdout, mine
    mine_uid = world.get_task(agents, "mine")["metadata"]["uid"]
    self_approval = run(kc, "approve", "mine", "-n", agents, "--uid", mine_uid)
    assert self_approval.returncode == 2, self_approval
    assert "self-approval is refused" in self_approval.stderr
    # without the UID: the task is shown, nothing is decided
    shown_first = run(kc, "approve", "carols", "-n", agents)
    assert shown_first.returncode == 2 and "CHG-1: read pods" in shown_first.stdout
    assert f"--uid {uid[:8]}" in shown_first.stderr
    # a UID that is not this task's (it was deleted and created again meanwhile)
    wrong = run(kc, "approve", "carols", "-n", agents, "--uid", "00000000")
    assert wrong.returncode == 1 and "not the task you read" in wrong.stderr
    assert world.kube.list(AGENT_TASK_APPROVALS, agents) == []
    approved = run(
        kc, "approve", "carols", "-n", agents, "--uid", uid[:8], "--comment", "fine by me"
    )
    assert approved.returncode == 0, approved.stderr
    assert "Approve on agenttask/carols by admin" in approved.stdout
    world.wait_phase(agents, "carols", "Active")
    shown = run(kc, "status", "carols", "-n", agents)
    assert 'Approval:     Approve by admin "fine by me" (counted)' in shown.stdout, shown.stdout
    made = world.kube.list(AGENT_TASK_APPROVALS, agents)
    assert [a["spec"]["approver"]["username"] for a in made] == ["admin"]
    late = run(kc, "deny", "carols", "-n", agents, "--uid", uid)
    assert late.returncode == 1 and "not waiting for approval" in late.stderr

    suspended = run(kc, "suspend", "bot", "-n", agents)
    assert suspended.returncode == 0, suspended.stderr
    sa = world.kube.get(SERVICE_ACCOUNTS, agents, "bot")
    assert sa["metadata"]["annotations"]["agentaccess.io/suspended"] == "true"
    done = world.wait_phase(agents, "carols", "Revoked")
    assert done["status"]["reason"] == "AgentSuspended"
    assert run(kc, "resume", "bot", "-n", agents).returncode == 0
    sa = world.kube.get(SERVICE_ACCOUNTS, agents, "bot")
    assert "agentaccess.io/suspended" not in (sa["metadata"].get("annotations") or {})
    assert run(kc, "suspend", "nobody", "-n", agents).returncode == 1
    unstaged = run(kc, "advance", "carols", "stage-2", "-n", agents)
    assert unstaged.returncode == 1 and "has no stages" in unstaged.stderr
