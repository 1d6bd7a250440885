"""Dry run against the real API server: `spec.dryRun` decides as a real task and creates
nothing; `check -f` prints the same decision for a file and writes nothing at all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from agent_access.kube import AGENT_TASKS, SECRETS, SERVICE_ACCOUNTS, KubeError

from .cluster import wait_for

READ = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]
BIN = Path(sys.executable).parent


def scene(world, **policy):
    agents, target = world.namespace("dry-agents"), world.namespace("dry-target")
    world.service_account(agents, "bot")
    world.policy(target, "read", [(agents, "bot")], READ, maxTTL="10m", **policy)
    return agents, target


def nothing_issued(world, agents: str, task: dict) -> None:
    assert world.task_objects(task) == []
    assert not [
        sa for sa in world.kube.list(SERVICE_ACCOUNTS, agents)
        if sa["metadata"]["name"].startswith("aat-")
    ]  # fmt: skip
    assert not [
        s for s in world.kube.list(SECRETS, agents) if s.get("type") == "agentaccess.io/token"
    ]


def test_a_dry_run_is_decided_like_a_real_task_and_creates_nothing(world, operator):
    agents, target = scene(world)
    world.task(
        agents, "paper", "bot", [{"namespace": target, "rules": READ}], ttl="1h", dryRun=True
    )
    task = world.wait_phase(agents, "paper", {"Completed", "Active", "Denied", "Failed"})
    st = task["status"]
    assert (st["phase"], st["reason"]) == ("Completed", "DryRun"), st
    assert st["grants"] == [{"namespace": target, "rules": READ}]
    assert st["policies"] == [f"{target}/read"]
    assert st["expiresAt"] and "serviceAccountName" not in st and "tokenSecretName" not in st
    assert "dry run: would be granted 1 rule in" in st["message"]
    nothing_issued(world, agents, task)
    try:  # a dry run stays one: the spec is immutable
        world.kube.merge_patch(AGENT_TASKS, agents, "paper", {"spec": {"dryRun": False}})
        raise AssertionError("dryRun was changed after creation")
    except KubeError as exc:
        assert exc.status == 422 and "immutable" in str(exc), exc
    events = wait_for(lambda: world.events(agents, "paper"), 5, what="the DryRun Event")
    assert [e["reason"] for e in events] == ["DryRun"]
    lines = [
        line for line in operator.audit_lines() if line["task"]["uid"] == task["metadata"]["uid"]
    ]
    assert [(line["phase"], line["reason"]) for line in lines] == [("Completed", "DryRun")]
    assert lines[0]["grantedRules"] == [{"namespace": target, "rules": READ}]


def test_a_dry_run_that_would_be_denied_ends_with_the_real_reason(world, operator):
    agents, _ = scene(world)
    elsewhere = world.namespace("dry-elsewhere")
    world.task(agents, "nope", "bot", [{"namespace": elsewhere, "rules": READ}], dryRun=True)
    task = world.wait_phase(agents, "nope", {"Completed", "Denied"})
    assert (task["status"]["phase"], task["status"]["reason"]) == ("Denied", "NoMatchingPolicy")
    nothing_issued(world, agents, task)


def check(kubeconfig: str, path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "agent-access-operator"), "check", "-f", str(path), *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, KUBECONFIG=kubeconfig),
        timeout=60,
    )


def test_check_prints_the_decision_for_a_file_and_writes_nothing(world, operator, tmp_path):
    agents, target = scene(world, requesters=[{"kind": "User", "name": "alice"}])
    task = {
        "apiVersion": "agentaccess.io/v1alpha1",
        "kind": "AgentTask",
        "metadata": {"name": "planned", "namespace": agents},
        "spec": {
            "agent": "bot",
            "intent": "try",
            "ttl": "1h",
            "access": [{"namespace": target, "rules": READ}],
        },
    }
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(task))
    ok = check(world.kubeconfig, path, "--as", "alice")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("Granted (nothing was created): granted 1 rule in " + target)
    assert "TTL 600s (asked 1h)" in ok.stdout
    as_json = json.loads(check(world.kubeconfig, path, "--as", "alice", "-o", "json").stdout)
    assert as_json["decision"] == "Granted" and as_json["policies"] == [f"{target}/read"]
    assert as_json["requester"]["username"] == "alice"
    # by default the requester is the caller (here the admin), whom the policy does not list
    me = check(world.kubeconfig, path)
    assert me.returncode == 1 and "Denied (RequesterNotAllowed)" in me.stdout, me
    other = check(world.kubeconfig, path, "--as", "bob")
    assert other.returncode == 1 and "RequesterNotAllowed" in other.stdout
    task["spec"]["access"][0]["rules"] = [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["delete"]}
    ]
    path.write_text(yaml.safe_dump(task))
    denied = check(world.kubeconfig, path, "--as", "alice")
    assert denied.returncode == 1 and "Denied (RuleNotAllowed)" in denied.stdout, denied
    assert world.kube.list(AGENT_TASKS, agents) == []  # nothing was ever created
    plugin = subprocess.run(
        [str(BIN / "kubectl-agentaccess"), "check", "-f", str(path), "--as", "alice"],
        capture_output=True, text=True, env=dict(os.environ, KUBECONFIG=world.kubeconfig),
    )  # fmt: skip
    assert plugin.returncode == 1 and "RuleNotAllowed" in plugin.stdout
