"""Bad input and an attack corpus: each attempt is Denied, refused, or shown harmless."""

from __future__ import annotations

import json

from agent_access.kube import ROLE_BINDINGS, SECRETS, SERVICE_ACCOUNTS

from .cluster import as_token, can, list_pods_status, status_code, unique

READ = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]


def scene(world, rules=None, **policy):
    agents = world.namespace("atk-agents")
    target = world.namespace("atk-target")
    world.service_account(agents, "bot")
    world.policy(target, "p", [(agents, "bot")], rules or READ, **policy)
    return agents, target


def test_a_thousand_rules_and_a_hostile_intent(world, operator):
    agents, target = scene(world)
    rules = [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"], "resourceNames": [f"pod-{i}"]}
        for i in range(1000)
    ]
    intent = ('"; DROP TABLE audit; --\n\r\t\x01\x1b[2J' + "\u202e\u0000").replace(
        "\u0000", ""
    ) + "x" * (65536 - 40)
    name = unique("big")
    world.task(agents, name, "bot", [{"namespace": target, "rules": rules}], intent=intent)
    task = world.wait_phase(agents, name, "Active", timeout=20)
    assert len(task["status"]["grants"][0]["rules"]) == 1000
    client = as_token(world.kubeconfig, world.token(task))
    assert can(client, "get", "pods", target, name="pod-999")
    assert not can(client, "get", "pods", target, name="pod-1000")
    assert not can(client, "list", "pods", target)
    lines = [json.loads(line) for line in operator.audit_file.read_text().splitlines()]
    mine = [line for line in lines if line["task"]["name"] == name]
    assert mine and mine[0]["intent"] == intent
    assert operator.ready()


def test_escape_attempts_with_a_live_token_fail(world, operator):
    """Trying to make access outlive the grant: mint a token, bind a role, plant a
    long-lived token Secret, create a pod, impersonate. All refused."""
    agents, target = scene(world)
    name = unique("esc")
    world.task(agents, name, "bot", [{"namespace": target, "rules": READ}])
    task = world.wait_phase(agents, name, "Active")
    me = task["status"]["serviceAccountName"]
    client = as_token(world.kubeconfig, world.token(task))
    assert status_code(lambda: client.request_token(agents, me, 3600, (), None)) == 403
    assert status_code(lambda: client.request_token(agents, "bot", 3600, (), None)) == 403
    assert (
        status_code(
            lambda: client.create(
                ROLE_BINDINGS,
                target,
                {
                    "metadata": {"name": "keep"},
                    "roleRef": {
                        "apiGroup": "rbac.authorization.k8s.io",
                        "kind": "ClusterRole",
                        "name": "admin",
                    },
                    "subjects": [{"kind": "ServiceAccount", "name": me, "namespace": agents}],
                },
            )
        )
        == 403
    )
    assert (
        status_code(
            lambda: client.create(
                SECRETS,
                target,
                {
                    "metadata": {
                        "name": "forever",
                        "annotations": {"kubernetes.io/service-account.name": "default"},
                    },
                    "type": "kubernetes.io/service-account-token",
                },
            )
        )
        == 403
    )
    assert (
        status_code(lambda: client.create(SERVICE_ACCOUNTS, target, {"metadata": {"name": "mine"}}))
        == 403
    )
    assert not can(client, "create", "pods", target)
    assert not can(client, "impersonate", "serviceaccounts", target)
    assert not can(client, "get", "secrets", agents)  # not even its own token Secret
    assert list_pods_status(client, target) == 200


def test_install_guardrails_close_what_a_careless_policy_opens(world, solo):
    """Creating pods (runs as any ServiceAccount there), exec into pods, reading Secrets:
    allowed by a careless policy with the defaults (see docs/security.md), Denied once
    the install adds guardrails for them."""
    agents, target = scene(
        world, rules=[{"apiGroups": ["", "apps"], "resources": ["*"], "verbs": ["*"]}]
    )
    risky = {
        "pods-create": {"apiGroups": [""], "resources": ["pods"], "verbs": ["create"]},
        "deployments": {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["create"]},
        "exec": {"apiGroups": [""], "resources": ["pods/exec"], "verbs": ["create"]},
        "secrets": {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
    }
    solo(args=["--protect-resource", "pods,deployments", "--forbid-resource", "pods/exec,secrets"])
    for what, rule in risky.items():
        name = unique(what)
        world.task(agents, name, "bot", [{"namespace": target, "rules": [rule]}])
        final = world.wait_phase(agents, name, {"Denied", "Active"})
        assert final["status"]["phase"] == "Denied", what
        assert final["status"]["reason"] == "Forbidden", what
    # reading pods stays possible under the same install
    name = unique("ok")
    world.task(agents, name, "bot", [{"namespace": target, "rules": READ}])
    assert world.wait_phase(agents, name, {"Denied", "Active"})["status"]["phase"] == "Active"


def test_careless_policy_risks_are_real_with_defaults(world, operator):
    """With the defaults, a policy allowing pod creation is honoured: that is the risk
    docs/security.md asks policy authors to keep out. Shown, not hidden."""
    agents, target = scene(
        world, rules=[{"apiGroups": [""], "resources": ["pods"], "verbs": ["create"]}]
    )
    name = unique("careless")
    world.task(
        agents,
        name,
        "bot",
        [
            {
                "namespace": target,
                "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["create"]}],
            }
        ],
    )
    assert world.wait_phase(agents, name, {"Denied", "Active"})["status"]["phase"] == "Active"
