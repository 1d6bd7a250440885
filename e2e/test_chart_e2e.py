"""The chart installed with helm; the operator runs under the chart's own identity."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from agent_access.kube import Resource

from .scenario import run_scenario


def test_helm_install_creates_crds_and_rbac(kubeconfig, release):
    kinds = {(d["kind"], d["metadata"]["name"]) for d in release}
    assert ("CustomResourceDefinition", "agenttasks.agentaccess.io") in kinds
    assert ("ClusterRole", "agent-access-operator") in kinds
    assert ("ClusterRole", "agent-access-operator-grant") in kinds
    assert ("ServiceAccount", "agent-access-operator") in kinds
    crds = Resource("/apis/apiextensions.k8s.io/v1", "customresourcedefinitions", False)
    from tests.integration.cluster import admin

    kube = admin(kubeconfig)
    for name in ("agenttasks", "accesspolicies", "clusteraccesspolicies"):
        assert kube.get(crds, None, f"{name}.agentaccess.io")


def test_kubectl_get_agenttasks_shows_the_printer_columns(
    kubeconfig, release, chart_operator, world
):
    ns = world.namespace("e2e-columns")
    world.service_account(ns, "bot")
    world.task(
        ns,
        "columns",
        "bot",
        [{"rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]}],
    )
    world.wait_phase(ns, "columns", {"Denied", "Active"})
    kubectl = Path(sys.executable).with_name("kubectl")
    out = subprocess.run(
        [str(kubectl), "get", "agenttasks", "-n", ns],
        check=True,
        capture_output=True,
        text=True,
        env=dict(os.environ, KUBECONFIG=kubeconfig),
    ).stdout
    header = out.splitlines()[0].split()
    assert header == ["NAME", "AGENT", "PHASE", "REASON", "EXPIRES", "AGE"]
    assert "Denied" in out and "NoMatchingPolicy" in out


def test_lifecycle_under_the_chart_identity(world, chart_operator):
    timings = run_scenario(world)
    from tests.integration.cluster import record_timing

    for what, seconds in timings.items():
        record_timing(f"e2e {what}: trigger -> 403", seconds)


def test_human_approval_under_the_chart_identity(world, chart_operator):
    """The chart's RBAC lets the operator watch AgentTaskApprovals and its admission
    policies stamp the approver: a task waits, is approved, is granted."""
    from tests.integration.cluster import as_user

    from agent_access.kube import AGENT_TASK_APPROVALS

    agents, target = world.namespace("e2e-appr-agents"), world.namespace("e2e-appr-target")
    world.service_account(agents, "bot")
    rules = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]
    world.policy(
        target, "gated", [(agents, "bot")], rules,
        approval={"required": 1, "approvers": [{"kind": "User", "name": "alice"}]},
    )  # fmt: skip
    world.allow(agents, "approver", ["alice"], ["agenttaskapprovals"], ["create"])
    task = world.task(agents, "gated", "bot", [{"namespace": target, "rules": rules}])
    waiting = world.wait_phase(agents, "gated", "Pending")
    assert world.task_objects(task) == []
    made = as_user(world.kubeconfig, "alice").create(
        AGENT_TASK_APPROVALS,
        agents,
        {
            "apiVersion": "agentaccess.io/v1alpha1",
            "kind": "AgentTaskApproval",
            "metadata": {"name": "yes"},
            "spec": {"taskName": "gated", "taskUID": waiting["metadata"]["uid"],
                     "decision": "Approve", "approver": {"username": "mallory"}},
        },
    )  # fmt: skip
    assert made["spec"]["approver"]["username"] == "alice"
    active = world.wait_phase(agents, "gated", "Active", timeout=20)
    assert active["status"]["approvals"][0]["counted"] is True
