"""The Kubernetes primitives the operator relies on, against the real API server.

ServiceAccount + TokenRequest + Role/RoleBinding: the bound verb is allowed and
others refused; deleting the RoleBinding refuses at once (403); deleting the
ServiceAccount stops the token authenticating (401, after the API server's
~10 s authentication cache).
"""

from __future__ import annotations

import time

import pytest

from agent_access.kube import ROLE_BINDINGS, ROLES, SERVICE_ACCOUNTS, KubeError

from .cluster import as_token, can, list_pods_status, poll_status, record_timing


def test_server_is_the_version_asked_for(server_version):
    """make test: 1.37.2; make test-matrix: the oldest supported (K8S_VERSION)."""
    import os

    assert server_version == f"v{os.environ.get('K8S_VERSION', '1.37.2')}"


def test_token_request_rbac_and_revocation(world, server_version):
    ns = world.namespace("prim")
    world.service_account(ns, "probe")
    token, expires = world.kube.request_token(ns, "probe", 600, (), None)
    assert token and expires
    client = as_token(world.kubeconfig, token)
    assert list_pods_status(client, ns) == 403

    world.kube.create(
        ROLES,
        ns,
        {
            "metadata": {"name": "probe"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}],
        },
    )
    world.kube.create(
        ROLE_BINDINGS,
        ns,
        {
            "metadata": {"name": "probe"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "probe"},
            "subjects": [{"kind": "ServiceAccount", "name": "probe", "namespace": ns}],
        },
    )
    poll_status(lambda: list_pods_status(client, ns), {200}, 5)
    assert can(client, "list", "pods", ns)
    assert not can(client, "delete", "pods", ns)
    assert not can(client, "list", "secrets", ns)
    assert not can(client, "list", "pods", "default")

    started = time.monotonic()
    world.kube.delete(ROLE_BINDINGS, ns, "probe")
    poll_status(lambda: list_pods_status(client, ns), {403, 401}, 5)
    record_timing("primitive: delete RoleBinding -> 403", time.monotonic() - started)

    started = time.monotonic()
    world.kube.delete(SERVICE_ACCOUNTS, ns, "probe")
    poll_status(lambda: list_pods_status(client, ns), {401}, 20, interval=0.2)
    record_timing("primitive: delete ServiceAccount -> 401", time.monotonic() - started)


def test_token_request_refuses_under_ten_minutes(world):
    ns = world.namespace("prim")
    world.service_account(ns, "probe")
    with pytest.raises(KubeError) as err:
        world.kube.request_token(ns, "probe", 599, (), None)
    assert err.value.status == 422
    assert "10 minutes" in err.value.reason


def test_token_bound_to_secret_dies_with_the_secret(world):
    """The operator binds each token to its Secret: deleting the Secret kills it."""
    from agent_access.kube import SECRETS

    ns = world.namespace("prim")
    world.service_account(ns, "probe")
    secret = world.kube.create(SECRETS, ns, {"metadata": {"name": "holder"}, "data": {}})
    token, _ = world.kube.request_token(
        ns,
        "probe",
        600,
        (),
        {"apiVersion": "v1", "kind": "Secret", "name": "holder", "uid": secret["metadata"]["uid"]},
    )
    client = as_token(world.kubeconfig, token)
    assert list_pods_status(client, ns) == 403  # authenticated, not authorized
    world.kube.delete(SECRETS, ns, "holder")
    poll_status(lambda: list_pods_status(client, ns), {401}, 20, interval=0.2)


def test_kubectl_explain_describes_the_fields_users_read_most(kubeconfig, crds):
    """The live API server publishes the CRDs' descriptions to `kubectl explain`."""
    import subprocess
    import sys
    from pathlib import Path

    kubectl = Path(sys.executable).with_name("kubectl")
    for field in (
        "agenttask.status.expiresAt",
        "agenttask.status.grants",
        "agenttask.status.conditions",
        "clusteraccesspolicy.spec.namespaceSelector.matchExpressions",
    ):
        out = subprocess.run(
            [str(kubectl), "--kubeconfig", kubeconfig, "explain", field],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        description = out.split("DESCRIPTION:", 1)[1].split("FIELDS:", 1)[0].strip()
        assert description and description != "<empty>", (field, out)
