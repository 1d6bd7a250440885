"""The operator's own identity is not a master key: under the chart's exact identity
(its RBAC plus its admission policies) it cannot mint a token for any other
ServiceAccount, delete or read a foreign ServiceAccount or Secret, bind anything
but its own Role, or touch its own namespace; and it grants nothing there."""

from __future__ import annotations

import yaml
from tests.integration.cluster import as_token, status_code, unique

from agent_access.kube import ROLE_BINDINGS, ROLES, SECRETS, SERVICE_ACCOUNTS

from .conftest import NAMESPACE

READ = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]


def operator_client(world, chart_operator):
    from pathlib import Path

    cfg = yaml.safe_load(Path(chart_operator.kubeconfig).read_text())
    return as_token(world.kubeconfig, cfg["users"][0]["user"]["token"])


def test_the_operators_token_is_not_a_master_key(world, chart_operator):
    me = operator_client(world, chart_operator)
    ns = world.namespace("e2e-victim")
    world.service_account(ns, "precious")
    world.kube.create(
        SECRETS, ns, {"metadata": {"name": "precious"}, "stringData": {"password": "hunter2"}}
    )
    # no token for any ServiceAccount it did not make, here or in kube-system
    assert status_code(lambda: me.request_token(ns, "precious", 3600, (), None)) == 403
    assert status_code(lambda: me.request_token("kube-system", "default", 3600, (), None)) in (
        403,
        404,
    )
    # no deleting foreign ServiceAccounts or Secrets
    assert status_code(lambda: me.delete(SERVICE_ACCOUNTS, ns, "precious")) == 403
    assert status_code(lambda: me.delete(SECRETS, ns, "precious")) == 403
    # and no reading a foreign Secret by any verb: get, list, watch (RBAC), an empty
    # or label-only patch, or an update (admission), each of which would return it
    assert status_code(lambda: me.get(SECRETS, ns, "precious")) == 403
    assert status_code(lambda: me.list(SECRETS, ns)) == 403
    assert (
        status_code(
            lambda: me.request(
                "GET", SECRETS.path(ns), query=[("watch", "1"), ("timeoutSeconds", "1")]
            )
        )
        == 403
    )
    assert status_code(lambda: me.merge_patch(SECRETS, ns, "precious", {})) == 403
    label = {"metadata": {"labels": {"x": "y"}}}
    assert status_code(lambda: me.merge_patch(SECRETS, ns, "precious", label)) == 403
    foreign = world.kube.get(SECRETS, ns, "precious")
    assert (
        status_code(
            lambda: me.request(
                "PUT", SECRETS.path(ns, "precious"), body=foreign, resource="secrets"
            )
        )
        == 403
    )
    assert world.kube.get(SERVICE_ACCOUNTS, ns, "precious") is not None
    # no ServiceAccount of its own outside the reserved names
    assert (
        status_code(lambda: me.create(SERVICE_ACCOUNTS, ns, {"metadata": {"name": "mine"}})) == 403
    )
    # no binding cluster-admin (or any ClusterRole) to anyone
    binding = {
        "metadata": {
            "name": "aat-x",
            "labels": {
                "agentaccess.io/task-uid": "x",
                "app.kubernetes.io/managed-by": "agent-access-operator",
            },
        },
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": "cluster-admin",
        },
        "subjects": [{"kind": "ServiceAccount", "name": "precious", "namespace": ns}],
    }
    assert status_code(lambda: me.create(ROLE_BINDINGS, ns, binding)) == 403
    # no Role holding '*' even with the operator's labels
    role = {
        "metadata": {"name": "aat-x", "labels": binding["metadata"]["labels"]},
        "rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}],
    }
    assert status_code(lambda: me.create(ROLES, ns, role)) == 403
    # nor a Role with what the guardrails forbid, e.g. relabelling namespaces
    role["rules"] = [{"apiGroups": [""], "resources": ["namespaces"], "verbs": ["patch"]}]
    assert status_code(lambda: me.create(ROLES, ns, role)) == 403
    # a "token reader" binding cannot hand a Role to a ServiceAccount elsewhere
    reader = {
        "metadata": {"name": "aat-x-token-reader", "labels": binding["metadata"]["labels"]},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": "aat-x-token-reader",
        },
        "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": "kube-system"}],
    }
    assert status_code(lambda: me.create(ROLE_BINDINGS, ns, reader)) == 403
    # nothing at all in its own namespace
    role["rules"] = READ
    assert status_code(lambda: me.create(ROLES, NAMESPACE, role)) == 403


def test_nothing_is_granted_in_the_operators_namespace(world, chart_operator):
    agents = world.namespace("e2e-agents")
    world.service_account(agents, "bot")
    world.policy(NAMESPACE, unique("own"), [(agents, "bot")], READ)
    name = unique("own")
    world.task(agents, name, "bot", [{"namespace": NAMESPACE, "rules": READ}])
    task = world.wait_phase(agents, name, {"Denied", "Active", "Failed"})
    assert task["status"]["phase"] == "Denied" and task["status"]["reason"] == "Forbidden"
    assert "does not grant into this namespace" in task["status"]["message"]
