"""The chart's operator RBAC holds nothing superfluous: remove any one rule and the
lifecycle breaks. Each rule is removed from the live ClusterRole/Role in turn,
the operator restarted under the chart identity, and the scenario must fail."""

from __future__ import annotations

import copy

import pytest

from agent_access.kube import Resource

from .conftest import NAMESPACE
from .scenario import run_scenario

CLUSTER_ROLES = Resource("/apis/rbac.authorization.k8s.io/v1", "clusterroles", False)
ROLES = Resource("/apis/rbac.authorization.k8s.io/v1", "roles")
LEASES = Resource("/apis/coordination.k8s.io/v1", "leases")

ROLE_NAMES = [
    ("ClusterRole", "agent-access-operator"),
    ("ClusterRole", "agent-access-operator-grant"),
    ("Role", "agent-access-operator-leader-election"),
]


def rules_of(release):
    for kind, name in ROLE_NAMES:
        doc = next(d for d in release if d["kind"] == kind and d["metadata"]["name"] == name)
        for i, rule in enumerate(doc["rules"]):
            yield kind, name, i, rule


def test_full_rbac_passes(world, chart_operator):
    """The baseline: the unmodified chart RBAC passes the same scenario."""
    run_scenario(world)


def _cases():
    from pathlib import Path

    import yaml

    text = (Path(__file__).resolve().parents[1] / "manifests" / "install.yaml").read_text()
    release = [d for d in yaml.safe_load_all(text) if d]
    return [
        pytest.param(k, n, i, id=f"{n}[{i}]:{'/'.join(r['resources'])}:{','.join(r['verbs'])}")
        for k, n, i, r in rules_of(release)
    ]


@pytest.mark.parametrize("kind,name,index", _cases())
def test_removing_any_rule_breaks_the_operator(
    world, kubeconfig, release, chart_operator, kind, name, index
):
    res, ns = (CLUSTER_ROLES, None) if kind == "ClusterRole" else (ROLES, NAMESPACE)
    original = world.kube.get(res, ns, name)
    reduced = copy.deepcopy(original)
    removed = reduced["rules"].pop(index)
    chart_operator.stop()
    world.kube.delete(LEASES, NAMESPACE, "agent-access-operator")  # a fresh election
    world.kube.request("PUT", res.path(ns, name), body=reduced)
    try:
        try:
            chart_operator.start(wait=15)
        except AssertionError:
            return  # it cannot even start: the rule is needed
        broke = False
        try:
            run_scenario(world, step_timeout=5)
        except AssertionError:
            broke = True
        if chart_operator.proc.proc.poll() is not None:
            broke = True  # the operator gave up (e.g. it could not renew its Lease)
        assert broke, f"the lifecycle passed without the rule {removed}: it is superfluous"
    finally:
        chart_operator.stop()
        current = world.kube.get(res, ns, name)
        original["metadata"] = {"name": name, "namespace": ns} if ns else {"name": name}
        original["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        world.kube.request("PUT", res.path(ns, name), body=original)
        world.kube.delete(LEASES, NAMESPACE, "agent-access-operator")
        chart_operator.start()
