"""Metrics move as a real lifecycle runs; audit lines match the documented schema and
rebuild a task's path; `agent-access-operator audit` prints a finished task's timeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
from prometheus_client.parser import text_string_to_metric_families

from agent_access.kube import ACCESS_POLICIES, AGENT_TASKS, PODS, SERVICE_ACCOUNTS

from .cluster import ROOT, as_token, list_pods_status, poll_status, unique, wait_for

READ = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]


def scrape(operator) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(operator.metrics()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples, name, **labels) -> float:
    """Sum over every label set that includes `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def test_metrics_follow_a_real_lifecycle(world, operator):
    agents = world.namespace("obs-agents")
    target = world.namespace("obs-target")
    world.service_account(agents, "bot")
    world.service_account(agents, "bot2")
    world.policy(target, "read", [(agents, "bot"), (agents, "bot2")], READ)
    before = scrape(operator)

    def live(agent="bot", **spec):
        name = unique("obs")
        world.task(agents, name, agent, [{"namespace": target, "rules": READ}], **spec)
        task = world.wait_phase(agents, name, "Active")
        client = as_token(world.kubeconfig, world.token(task))
        return task, client

    # one denial
    world.task(
        agents,
        unique("obs-deny"),
        "bot",
        [
            {
                "namespace": target,
                "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}],
            }
        ],
    )
    triggers = {}
    # every trigger once
    t, c = live(ttl="2s")
    triggers["TTLExpired"] = (t, c)
    for phase, reason in (("Succeeded", "PodSucceeded"), ("Failed", "PodFailed")):
        pod = unique("p")
        world.pod(agents, pod, "bot")
        t, c = live(podName=pod)
        world.set_pod_phase(agents, pod, phase)
        triggers[reason] = (t, c)
    pod = unique("p")
    world.pod(agents, pod, "bot")
    t, c = live(podName=pod)
    world.kube.delete(PODS, agents, pod)
    triggers["PodDeleted"] = (t, c)
    t, c = live()
    world.kube.merge_patch(AGENT_TASKS, agents, t["metadata"]["name"], {"spec": {"cancel": True}})
    triggers["Cancelled"] = (t, c)
    t, c = live()
    world.kube.delete(AGENT_TASKS, agents, t["metadata"]["name"])
    triggers["TaskDeleted"] = (t, c)
    t, c = live(agent="bot2")
    world.kube.delete(SERVICE_ACCOUNTS, agents, "bot2")
    triggers["AgentNotFound"] = (t, c)
    ttl_task = triggers["TTLExpired"][0]["metadata"]["name"]
    world.wait_phase(agents, ttl_task, "Expired", timeout=10)  # before the policy changes
    t, c = live()
    world.kube.merge_patch(
        ACCESS_POLICIES,
        target,
        "read",
        {"spec": {"rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]}},
    )
    triggers["PolicyChanged"] = (t, c)
    for _t, c in triggers.values():
        poll_status(lambda c=c: list_pods_status(c, target), {401, 403}, 5)

    def settled():
        s = scrape(operator)
        return (
            s
            if all(
                value(s, "agentaccess_grants_revoked_total", reason=r)
                > value(before, "agentaccess_grants_revoked_total", reason=r)
                for r in triggers
            )
            else None
        )

    after = wait_for(settled, 10, 0.2, "revocation counters")
    assert value(after, "agentaccess_grants_issued_total") - value(
        before, "agentaccess_grants_issued_total"
    ) >= len(triggers)
    assert value(after, "agentaccess_grants_denied_total", reason="RuleNotAllowed") > value(
        before, "agentaccess_grants_denied_total", reason="RuleNotAllowed"
    )
    assert value(after, "agentaccess_grant_latency_seconds_count") - value(
        before, "agentaccess_grant_latency_seconds_count"
    ) >= len(triggers)
    for reason in triggers:
        assert total(after, "agentaccess_revocation_latency_seconds_count", trigger=reason) > total(
            before, "agentaccess_revocation_latency_seconds_count", trigger=reason
        ), reason
    assert value(after, "agentaccess_overdue_grants") == 0
    assert value(after, "agentaccess_active_grants") <= value(before, "agentaccess_active_grants")
    assert total(after, "agentaccess_kubernetes_api_requests_total") > total(
        before, "agentaccess_kubernetes_api_requests_total"
    )
    assert total(after, "agentaccess_handler_duration_seconds_count", handler="reconcile") > 0
    # API metrics are labelled by resource kind, never by object name (bounded cardinality)
    resources = {
        dict(ls).get("resource")
        for (n, ls) in after
        if n == "agentaccess_kubernetes_api_requests_total"
    }
    assert resources <= {
        "agenttasks",
        "agenttaskapprovals",
        "agenttasks/status",
        "accesspolicies",
        "accesspolicies/status",
        "clusteraccesspolicies/status",
        "subjectaccessreviews",
        "clusteraccesspolicies",
        "namespaces",
        "pods",
        "serviceaccounts",
        "serviceaccounts/token",
        "secrets",
        "roles",
        "rolebindings",
        "events",
        "leases",
        "version",  # the start-up check of the server (docs/versions.md)
        "discovery",
    }, resources
    assert {"namespaces", "serviceaccounts/token", "agenttasks/status"} <= resources


def test_health_endpoints(operator):
    import urllib.request

    for path in ("/healthz", "/readyz"):
        with urllib.request.urlopen(f"http://127.0.0.1:{operator.port}{path}", timeout=2) as r:
            assert r.status == 200


def test_audit_lines_validate_and_rebuild_a_path(world, operator):
    agents = world.namespace("aud-agents")
    target = world.namespace("aud-target")
    world.service_account(agents, "bot")
    world.policy(target, "read", [(agents, "bot")], READ)
    name = unique("aud")
    world.task(
        agents,
        name,
        "bot",
        [{"namespace": target, "rules": READ}],
        intent='hostile "quotes"\nnewline \x07 bell',
    )
    task = world.wait_phase(agents, name, "Active")
    world.kube.merge_patch(AGENT_TASKS, agents, name, {"spec": {"cancel": True}})
    world.wait_phase(agents, name, "Cancelled")
    world.kube.delete(AGENT_TASKS, agents, name)
    wait_for(lambda: world.get_task(agents, name) is None, 5, what="task gone")

    schema = json.loads((ROOT / "docs" / "audit.schema.json").read_text())
    checker = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    lines = wait_for(
        lambda: (
            [
                line
                for line in operator.audit_lines()
                if line["task"]["uid"] == task["metadata"]["uid"] and line["event"] == "deleted"
            ]
            and operator.audit_lines()
        ),
        5,
        what="audit lines",
    )
    for line in lines:
        checker.validate(line)
    mine = [line for line in lines if line["task"]["uid"] == task["metadata"]["uid"]]
    assert [line["event"] for line in mine] == ["granted", "revoked", "deleted"]
    assert mine[0]["intent"] == 'hostile "quotes"\nnewline \x07 bell'
    assert mine[0]["policies"][0]["resourceVersion"]
    assert {o["kind"] for o in mine[0]["objects"]} == {
        "ServiceAccount",
        "Secret",
        "Role",
        "RoleBinding",
    }
    # the task is gone from the cluster: the audit file alone rebuilds its path
    out = run_cli(
        "audit",
        name,
        "-n",
        agents,
        "--audit-file",
        str(operator.audit_file),
        "--no-cluster",
        "-o",
        "json",
        kubeconfig=world.kubeconfig,
    )
    path = json.loads(out)["tasks"][0]
    assert [e["event"] for e in path["timeline"]] == ["granted", "revoked", "deleted"]
    assert path["task"]["agent"] == "bot"


def test_audit_command_prints_a_finished_task_from_the_cluster(world, operator):
    agents = world.namespace("aud-agents")
    target = world.namespace("aud-target")
    world.service_account(agents, "bot")
    world.policy(target, "read", [(agents, "bot")], READ)
    name = unique("aud")
    world.task(agents, name, "bot", [{"namespace": target, "rules": READ}], ttl="2s")
    world.wait_phase(agents, name, "Expired", timeout=10)
    time.sleep(0.5)
    out = run_cli("audit", name, "-n", agents, kubeconfig=world.kubeconfig)
    assert f"AgentTask {agents}/{name}" in out
    events = [line.split()[1] for line in out.splitlines() if line.startswith("  20")]
    assert events[0] == "requested" and "granted" in events and events[-1] == "expired"
    assert "TTLExpired" in out
    by_agent = json.loads(
        run_cli("audit", "--agent", "bot", "-n", agents, "-o", "json", kubeconfig=world.kubeconfig)
    )
    assert [p["task"]["name"] for p in by_agent["tasks"]] == [name]


def run_cli(*args: str, kubeconfig: str) -> str:
    exe = Path(sys.executable).with_name("agent-access-operator")
    return subprocess.run(
        [str(exe), *args],
        check=True,
        capture_output=True,
        text=True,
        env=dict(os.environ, KUBECONFIG=kubeconfig),
    ).stdout


def test_a_single_instance_without_election_reports_itself_leader(operator):
    """Without --leader-elect the one instance acts, so `agentaccess_leader` is 1 (the
    chart's AgentAccessNoLeader alert, absent(agentaccess_leader == 1), stays quiet)."""
    assert value(scrape(operator), "agentaccess_leader") == 1.0


def test_the_server_is_checked_at_start_up(operator):
    """The operator read the server's version and admission API: both policy kinds
    are served here, it says so in its log and metrics, and it started."""
    import re

    text = operator.metrics()
    for feature in ("validating-admission-policies", "mutating-admission-policies"):
        assert f'agentaccess_server_feature{{feature="{feature}"}} 1.0' in text
    assert re.search(r'agentaccess_server_supported\{version="v1\.\d+\.\d+"\} 1\.0', text)
    assert "mutating-admission-policies: yes" in operator.logs()
