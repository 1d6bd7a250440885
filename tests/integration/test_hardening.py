"""Nothing outside the operator steers it: each attack of the hardening review, made
through the public surface against the real API server with the operator running.

Two layers are attacked separately: admission (a non-admin's writes are refused)
and the operator itself (as a cluster admin, who passes admission, the same
writes still do not make it grant, spare, or delete anything it should not).
"""

from __future__ import annotations

import time

from agent_access.kube import (
    ACCESS_POLICIES,
    AGENT_TASKS,
    EVENTS,
    ROLE_BINDINGS,
    ROLES,
    SECRETS,
    SERVICE_ACCOUNTS,
    KubeError,
)

from .cluster import (
    as_token,
    as_user,
    can,
    list_pods_status,
    poll_status,
    record_timing,
    status_code,
    unique,
    wait_for,
)

READ = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]
RBAC = "rbac.authorization.k8s.io"


def scene(world, prefix="hard", **policy):
    agents = world.namespace(f"{prefix}-agents")
    target = world.namespace(f"{prefix}-target")
    world.service_account(agents, "bot")
    world.policy(target, "read", [(agents, "bot")], READ, **policy)
    return agents, target


def active(world, agents, target, name=None, **spec):
    name = name or unique("t")
    world.task(agents, name, "bot", [{"namespace": target, "rules": READ}], **spec)
    return world.wait_phase(agents, name, {"Active", "Denied", "Failed"})


def audit_line(operator, uid_or_name: str) -> dict:
    """The operator's audit line for a task (by UID or name), waiting for it."""

    def find():
        return next(
            (
                x
                for x in operator.audit_lines()
                if uid_or_name in (x["task"]["uid"], x["task"]["name"])
            ),
            None,
        )

    return wait_for(find, 5, what=f"the audit line of {uid_or_name}")


def allow(world, ns, user, resources, verbs, group="agentaccess.io"):
    """A Role + RoleBinding giving `user` (a username) these verbs in `ns`."""
    name = unique("r")
    world.kube.create(
        ROLES,
        ns,
        {
            "metadata": {"name": name},
            "rules": [{"apiGroups": [group], "resources": resources, "verbs": verbs}],
        },
    )
    kind = "User"
    subject = {"kind": kind, "name": user, "apiGroup": RBAC}
    if user.startswith("system:serviceaccount:"):
        _, _, sa_ns, sa = user.split(":")
        subject = {"kind": "ServiceAccount", "name": sa, "namespace": sa_ns}
    world.kube.create(
        ROLE_BINDINGS,
        ns,
        {
            "metadata": {"name": name},
            "roleRef": {"apiGroup": RBAC, "kind": "Role", "name": name},
            "subjects": [subject],
        },
    )


# -- admission: only the operator writes status, its annotations, its finalizer -------


def test_non_admins_cannot_write_status_annotations_or_finalizer(world, operator):
    agents, target = scene(world)
    task = active(world, agents, target)
    name = task["metadata"]["name"]
    allow(world, agents, "mallory", ["agenttasks", "agenttasks/status"], ["get", "patch", "update"])
    mallory = as_user(world.kubeconfig, "mallory")
    attempts = {
        "status": lambda: mallory.merge_patch(
            AGENT_TASKS, agents, name, {"status": {"phase": "Expired"}}, "status"
        ),
        "progress annotation": lambda: mallory.merge_patch(
            AGENT_TASKS,
            agents,
            name,
            {"metadata": {"annotations": {"agentaccess.io/last-handled-configuration": "{}"}}},
        ),
        "requester annotation": lambda: mallory.merge_patch(
            AGENT_TASKS,
            agents,
            name,
            {"metadata": {"annotations": {"agentaccess.io/requester-username": "root"}}},
        ),
        "finalizer": lambda: mallory.merge_patch(
            AGENT_TASKS, agents, name, {"metadata": {"finalizers": None}}
        ),
    }
    for what, attempt in attempts.items():
        try:
            attempt()
            raise AssertionError(f"{what}: accepted")
        except KubeError as exc:
            assert exc.status == 403 and "agent-access-operator" in exc.reason, (what, exc)
    # what the product needs from them still works: cancel
    mallory.merge_patch(AGENT_TASKS, agents, name, {"spec": {"cancel": True}})
    assert world.wait_phase(agents, name, "Cancelled")["status"]["reason"] == "Cancelled"


def test_planted_annotations_at_create_are_refused_or_overwritten(world, operator):
    agents, target = scene(world)
    allow(world, agents, "mallory", ["agenttasks"], ["create"])
    mallory = as_user(world.kubeconfig, "mallory")
    body = {
        "apiVersion": "agentaccess.io/v1alpha1",
        "kind": "AgentTask",
        "metadata": {
            "name": unique("plant"),
            "annotations": {"agentaccess.io/last-handled-configuration": '{"spec": {}}'},
        },
        "spec": {"agent": "bot", "intent": "x", "access": [{"namespace": target, "rules": READ}]},
    }
    assert status_code(lambda: mallory.create(AGENT_TASKS, agents, body)) == 403
    # A planted requester is overwritten with the API server's record (and the
    # finalizer, which admission adds anyway, is harmless): nothing planted survives.
    body["metadata"]["annotations"] = {"agentaccess.io/requester-username": "alice"}
    body["metadata"]["finalizers"] = ["agentaccess.io/revoke"]
    made = mallory.create(AGENT_TASKS, agents, body)
    assert made["metadata"]["annotations"]["agentaccess.io/requester-username"] == "mallory"
    assert made["metadata"]["finalizers"] == ["agentaccess.io/revoke"]
    got = world.wait_phase(agents, body["metadata"]["name"], {"Active", "Denied"})
    assert got["status"]["requester"]["username"] == "mallory"


# -- the operator acts on facts it owns, whatever got written ----------------------------


def _kopf_essence(body: dict) -> str:
    """What kopf (with annotation storage) recorded as "last handled" for this body: the
    body without status and bookkeeping. The operator no longer uses kopf; the attack
    stays, against whatever bookkeeping a future version might keep on the object."""
    import json

    essence = {"spec": body.get("spec") or {}}
    meta = body.get("metadata") or {}
    if meta.get("labels"):
        essence["metadata"] = {"labels": meta["labels"]}
    return json.dumps(essence, separators=(",", ":")) + "\n"


def test_planted_progress_annotations_do_not_stop_cancel_or_deletion(world, operator):
    """As an admin (past admission), the attacks that worked on kopf's annotation
    bookkeeping: cancel together with a planted "last handled" record that already
    says cancel (kopf then sees no change), and a planted "delete handler succeeded"
    record before deletion. Both still revoke."""
    import copy

    agents, target = scene(world)
    # cancel with a matching planted record, in one write
    task = active(world, agents, target)
    name = task["metadata"]["name"]
    client = as_token(world.kubeconfig, world.token(task))
    cancelled = copy.deepcopy(world.get_task(agents, name))
    cancelled["spec"]["cancel"] = True
    world.kube.merge_patch(
        AGENT_TASKS,
        agents,
        name,
        {
            "spec": {"cancel": True},
            "metadata": {
                "annotations": {
                    "agentaccess.io/last-handled-configuration": _kopf_essence(cancelled)
                }
            },
        },
    )
    world.wait_phase(agents, name, "Cancelled")
    poll_status(lambda: list_pods_status(client, target), {401, 403}, 5)
    wait_for(lambda: world.task_objects(task) == [], 5, what="no objects left")
    # deletion with a planted "the delete handler already succeeded"
    task = active(world, agents, target)
    name = task["metadata"]["name"]
    client = as_token(world.kubeconfig, world.token(task))
    done = (
        '{"started":"2026-01-01T00:00:00.000000+00:00","stopped":'
        '"2026-01-01T00:00:01.000000+00:00","purpose":"delete","retries":1,'
        '"success":true,"failure":false}'
    )
    world.kube.merge_patch(
        AGENT_TASKS,
        agents,
        name,
        {"metadata": {"annotations": {"agentaccess.io/task_deleted": done}}},
    )
    world.kube.delete(AGENT_TASKS, agents, name)
    poll_status(lambda: list_pods_status(client, target), {401, 403}, 5)
    wait_for(lambda: world.task_objects(task) == [], 5, what="no objects left")


def test_forged_status_neither_ends_nor_extends_a_grant(world, operator):
    """Marking a live grant finished used to take it out of the operator's care (so it
    outlived its TTL). Now the status is restored, and the TTL still ends it."""
    agents, target = scene(world)
    task = active(world, agents, target, ttl="6s")
    name = task["metadata"]["name"]
    client = as_token(world.kubeconfig, world.token(task))
    world.kube.merge_patch(
        AGENT_TASKS,
        agents,
        name,
        {
            "status": {
                "phase": "Expired",
                "reason": "TTLExpired",
                "expiresAt": "2099-01-01T00:00:00Z",
            }
        },
        "status",
    )
    restored = wait_for(
        lambda: (
            (world.get_task(agents, name)["status"]["phase"] == "Active")
            and world.get_task(agents, name)
        ),
        5,
        what="the status restored",
    )
    assert restored["status"]["expiresAt"] == task["status"]["expiresAt"]
    assert list_pods_status(client, target) == 200
    assert any(e["reason"] == "StatusRestored" for e in world.events(agents, name))
    final = world.wait_phase(agents, name, "Expired", timeout=10)
    assert final["status"]["reason"] == "TTLExpired"
    assert list_pods_status(client, target) in (401, 403)


def test_forged_status_grants_never_make_it_delete_foreign_objects(world, operator):
    agents, target = scene(world)
    task = active(world, agents, target)
    name = task["metadata"]["name"]
    precious = {
        "metadata": {"name": "precious"},
        "roleRef": {"apiGroup": RBAC, "kind": "ClusterRole", "name": "view"},
        "subjects": [{"kind": "User", "name": "bob", "apiGroup": RBAC}],
    }
    world.kube.create(ROLE_BINDINGS, target, precious)
    world.kube.create(SERVICE_ACCOUNTS, agents, {"metadata": {"name": "precious"}})
    world.kube.merge_patch(
        AGENT_TASKS,
        agents,
        name,
        {
            "status": {
                "serviceAccountName": "precious",
                "tokenSecretName": "precious",
                "grants": [
                    {"namespace": target, "roleName": "precious", "roleBindingName": "precious"}
                ],
            }
        },
        "status",
    )
    world.kube.merge_patch(AGENT_TASKS, agents, name, {"spec": {"cancel": True}})
    world.wait_phase(agents, name, "Cancelled")
    assert world.task_objects(task) == []
    assert world.kube.get(ROLE_BINDINGS, target, "precious") is not None
    assert world.kube.get(SERVICE_ACCOUNTS, agents, "precious") is not None


def test_a_name_taken_by_someone_else_is_never_deleted(world, solo):
    """The 409 path used to delete whatever held the name. Now issuance fails, clearly,
    and the foreign object stays."""
    agents, target = scene(world)
    name = unique("taken")
    task = world.task(agents, name, "bot", [{"namespace": target, "rules": READ}])
    # no operator yet: plant an object with the name the grant will use
    from agent_access.objects import base_name

    planned = base_name(name, task["metadata"]["uid"])
    world.kube.create(
        ROLE_BINDINGS,
        target,
        {
            "metadata": {"name": planned},
            "roleRef": {"apiGroup": RBAC, "kind": "ClusterRole", "name": "view"},
            "subjects": [{"kind": "User", "name": "bob", "apiGroup": RBAC}],
        },
    )
    solo()
    final = world.wait_phase(agents, name, {"Failed", "Active"})
    assert final["status"]["phase"] == "Failed" and final["status"]["reason"] == "IssueFailed"
    assert "was not created by the operator" in final["status"]["message"]
    kept = world.kube.get(ROLE_BINDINGS, target, planned)
    assert kept is not None and kept["subjects"][0]["name"] == "bob"
    assert world.task_objects(task) == []


def test_startup_sweep_deletes_only_provable_leftovers(world, operator):
    """Objects wearing the operator's labels but not its names, and a Secret named like
    a token Secret but not one, survive a restart's sweep."""
    agents = world.namespace("sweep")
    labels = {
        "app.kubernetes.io/managed-by": "agent-access-operator",
        "agentaccess.io/task-uid": "00000000-dead-beef-0000-000000000000",
        "agentaccess.io/task-name": "ghost",
        "agentaccess.io/task-namespace": agents,
    }
    world.kube.create(
        SERVICE_ACCOUNTS, agents, {"metadata": {"name": "db-admin", "labels": labels}}
    )
    from agent_access.objects import base_name

    ghost = base_name("ghost", labels["agentaccess.io/task-uid"])
    world.kube.create(SERVICE_ACCOUNTS, agents, {"metadata": {"name": ghost, "labels": labels}})
    world.kube.create(
        SECRETS, agents, {"metadata": {"name": f"{ghost}-token"}, "stringData": {"a": "b"}}
    )
    operator.stop()
    operator.start()
    assert world.kube.get(SERVICE_ACCOUNTS, agents, "db-admin") is not None
    # the correctly named, labelled orphan goes; the Secret that is not a token Secret stays
    wait_for(lambda: world.kube.get(SERVICE_ACCOUNTS, agents, ghost) is None, 5)
    assert world.kube.get(SECRETS, agents, f"{ghost}-token") is not None


def test_finalizer_removed_by_an_admin_still_revokes(world, operator):
    agents, target = scene(world)
    task = active(world, agents, target)
    name = task["metadata"]["name"]
    client = as_token(world.kubeconfig, world.token(task))
    world.kube.merge_patch(AGENT_TASKS, agents, name, {"metadata": {"finalizers": None}})
    world.kube.delete(AGENT_TASKS, agents, name)
    poll_status(lambda: list_pods_status(client, target), {401, 403}, 5)
    wait_for(lambda: world.task_objects(task) == [], 5, what="no objects left")


def test_a_stripped_finalizer_is_put_back_and_only_ours_is_ever_removed(world, operator):
    """The operator holds deleted tasks with its finalizer: stripped by an admin, it is
    put back (conditionally on the version it saw); on deletion it removes its own and
    nothing else, whatever other finalizers were added around it."""
    agents, target = scene(world)
    task = active(world, agents, target)
    name = task["metadata"]["name"]
    client = as_token(world.kubeconfig, world.token(task))
    world.kube.merge_patch(AGENT_TASKS, agents, name, {"metadata": {"finalizers": None}})
    wait_for(
        lambda: (
            world.get_task(agents, name)["metadata"].get("finalizers") == ["agentaccess.io/revoke"]
        ),
        5,
        what="the finalizer back",
    )
    others = ["example.com/before", "agentaccess.io/revoke", "example.com/after"]
    world.kube.merge_patch(AGENT_TASKS, agents, name, {"metadata": {"finalizers": others}})
    world.kube.delete(AGENT_TASKS, agents, name)
    poll_status(lambda: list_pods_status(client, target), {401, 403}, 5)
    wait_for(
        lambda: (
            world.get_task(agents, name)["metadata"].get("finalizers")
            == ["example.com/before", "example.com/after"]
        ),
        5,
        what="only the operator's finalizer removed",
    )
    assert world.get_task(agents, name)["metadata"].get("deletionTimestamp")
    wait_for(lambda: world.task_objects(task) == [], 5, what="no objects left")
    world.kube.merge_patch(AGENT_TASKS, agents, name, {"metadata": {"finalizers": None}})
    wait_for(lambda: world.kube.get(AGENT_TASKS, agents, name) is None, 5, what="task gone")


def test_a_foreign_finalizer_in_place_of_ours_does_not_keep_a_grant_alive(world, operator):
    """Our finalizer replaced by someone else's and the task deleted at once (before
    the operator could put its own back): the grant is revoked anyway, and cancel would
    have been too; the foreign finalizer is left alone."""
    agents, target = scene(world)
    task = active(world, agents, target)
    name = task["metadata"]["name"]
    client = as_token(world.kubeconfig, world.token(task))
    world.kube.merge_patch(
        AGENT_TASKS, agents, name, {"metadata": {"finalizers": ["example.com/keep"]}}
    )
    world.kube.delete(AGENT_TASKS, agents, name)
    poll_status(lambda: list_pods_status(client, target), {401, 403}, 5)
    wait_for(lambda: world.task_objects(task) == [], 5, what="no objects left")
    assert world.get_task(agents, name)["metadata"]["finalizers"] == ["example.com/keep"]
    world.kube.merge_patch(AGENT_TASKS, agents, name, {"metadata": {"finalizers": None}})
    wait_for(lambda: world.kube.get(AGENT_TASKS, agents, name) is None, 5, what="task gone")


def test_expiry_survives_a_restart_without_trusting_status(world, operator):
    agents, target = scene(world)
    task = active(world, agents, target, ttl="5s")
    name = task["metadata"]["name"]
    client = as_token(world.kubeconfig, world.token(task))
    operator.kill()
    try:
        world.kube.merge_patch(
            AGENT_TASKS, agents, name, {"status": {"expiresAt": "2099-01-01T00:00:00Z"}}, "status"
        )
        time.sleep(5)
    finally:
        operator.start()
    poll_status(lambda: list_pods_status(client, target), {401, 403}, 5)
    assert world.wait_phase(agents, name, "Expired")["status"]["reason"] == "TTLExpired"


# -- an agent asks for itself, reads only its own token, audiences governed ---------------


def test_an_agent_asks_only_for_itself(world, operator):
    agents, target = scene(world)
    world.service_account(agents, "mallory")
    allow(world, agents, f"system:serviceaccount:{agents}:mallory", ["agenttasks"], ["create"])
    allow(world, agents, f"system:serviceaccount:{agents}:bot", ["agenttasks"], ["create"])
    mallory = as_user(world.kubeconfig, f"system:serviceaccount:{agents}:mallory")
    bot = as_user(world.kubeconfig, f"system:serviceaccount:{agents}:bot")

    def ask(client, name):
        client.create(
            AGENT_TASKS,
            agents,
            {
                "apiVersion": "agentaccess.io/v1alpha1",
                "kind": "AgentTask",
                "metadata": {"name": name},
                "spec": {
                    "agent": "bot",
                    "intent": "x",
                    "access": [{"namespace": target, "rules": READ}],
                },
            },
        )
        return world.wait_phase(agents, name, {"Active", "Denied"})

    stolen = ask(mallory, unique("stolen"))
    assert stolen["status"]["phase"] == "Denied"
    assert stolen["status"]["reason"] == "RequesterNotAllowed"
    assert stolen["status"]["requester"]["username"] == f"system:serviceaccount:{agents}:mallory"
    assert world.task_objects(stolen) == []
    own = ask(bot, unique("own"))
    assert own["status"]["phase"] == "Active"
    assert own["status"]["requester"]["username"] == f"system:serviceaccount:{agents}:bot"
    assert f"system:serviceaccounts:{agents}" in own["status"]["requester"]["groups"]
    # a policy may name a ServiceAccount that asks on behalf of others
    world.policy(
        target,
        "planner",
        [(agents, "bot")],
        READ,
        requesters=[{"kind": "ServiceAccount", "namespace": agents, "name": "mallory"}],
    )
    assert ask(mallory, unique("listed"))["status"]["phase"] == "Active"
    lines = [
        line
        for line in operator.audit_lines()
        if line["task"]["name"] == stolen["metadata"]["name"]
    ]
    assert lines and lines[0]["requester"]["username"].endswith(":mallory")


def test_policy_requesters_restrict_people(world, operator):
    agents, target = scene(world, requesters=[{"kind": "Group", "name": "oncall"}])
    allow(world, agents, "alice", ["agenttasks"], ["create"])
    alice = as_user(world.kubeconfig, "alice")
    body = {
        "apiVersion": "agentaccess.io/v1alpha1",
        "kind": "AgentTask",
        "metadata": {"name": unique("alice")},
        "spec": {"agent": "bot", "intent": "x", "access": [{"namespace": target, "rules": READ}]},
    }
    alice.create(AGENT_TASKS, agents, body)
    got = world.wait_phase(agents, body["metadata"]["name"], {"Active", "Denied"})
    assert got["status"]["reason"] == "RequesterNotAllowed"
    oncall = as_user(world.kubeconfig, "carol", ("oncall",))
    allow(world, agents, "carol", ["agenttasks"], ["create"])
    body["metadata"]["name"] = unique("carol")
    oncall.create(AGENT_TASKS, agents, body)
    got = world.wait_phase(agents, body["metadata"]["name"], {"Active", "Denied"})
    assert got["status"]["phase"] == "Active", got["status"]


def test_an_agent_reads_only_its_own_token(world, operator):
    agents, target = scene(world)
    first, second = active(world, agents, target), active(world, agents, target)
    bot = as_user(world.kubeconfig, f"system:serviceaccount:{agents}:bot")
    mine, theirs = first["status"]["tokenSecretName"], second["status"]["tokenSecretName"]
    assert bot.get(SECRETS, agents, mine)["data"]["token"]
    assert can(bot, "get", "secrets", agents, name=theirs)  # also the agent's: its own task
    assert not can(bot, "list", "secrets", agents)
    assert not can(bot, "get", "secrets", agents, name="some-other-secret")
    world.service_account(agents, "other")
    other = as_user(world.kubeconfig, f"system:serviceaccount:{agents}:other")
    assert status_code(lambda: other.get(SECRETS, agents, mine)) == 403
    world.kube.merge_patch(
        AGENT_TASKS, agents, first["metadata"]["name"], {"spec": {"cancel": True}}
    )
    world.wait_phase(agents, first["metadata"]["name"], "Cancelled")
    assert not can(bot, "get", "secrets", agents, name=mine)


def test_audiences_are_governed_and_immutable(world, operator):
    agents, target = scene(world)
    denied = active(world, agents, target, audiences=["vault"])
    assert denied["status"]["reason"] == "AudienceNotAllowed"
    assert "vault" in denied["status"]["message"]
    world.policy(target, "vault", [(agents, "bot")], READ, allowedAudiences=["vault"])
    # the first policy still covers the request and does not allow it
    again = active(world, agents, target, audiences=["vault"])
    assert again["status"]["reason"] == "AudienceNotAllowed"
    world.kube.merge_patch(
        ACCESS_POLICIES,
        target,
        "read",
        {"spec": {"allowedAudiences": ["vault"]}},
    )
    ok = active(world, agents, target, audiences=["vault"])
    assert ok["status"]["phase"] == "Active"
    line = audit_line(operator, ok["metadata"]["uid"])
    assert line["audiences"] == ["vault"]
    plain = active(world, agents, target)
    assert (
        status_code(
            lambda: world.kube.merge_patch(
                AGENT_TASKS, agents, plain["metadata"]["name"], {"spec": {"audiences": ["x"]}}
            )
        )
        == 422
    )


# -- guardrails cover every way out ------------------------------------------------------


WIDE = [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]


def test_guardrails_hold_under_a_wildcard_policy(world, operator):
    agents, target = scene(world)
    world.policy(target, "everything", [(agents, "bot")], WIDE)
    for group, resource, verb in [
        ("", "users", "impersonate:user-info"),
        ("", "serviceaccounts", "impersonate:serviceaccount"),
        ("", "pods", "impersonate-on:user-info:list"),
        ("agentaccess.io", "accesspolicies", "create"),
        ("agentaccess.io", "agenttasks/status", "patch"),
        ("", "namespaces", "patch"),
        ("", "pods/ephemeralcontainers", "patch"),
    ]:
        name = unique("g")
        rule = {"apiGroups": [group], "resources": [resource], "verbs": [verb]}
        world.task(agents, name, "bot", [{"namespace": target, "rules": [rule]}])
        got = world.wait_phase(agents, name, {"Active", "Denied"})
        assert got["status"]["reason"] == "Forbidden", (rule, got["status"])


def test_a_per_task_identity_cannot_mint_a_lasting_token(world, operator):
    agents, target = scene(world)
    world.service_account(target, "standing")
    secrets = [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]}]
    world.policy(target, "secrets", [(agents, "bot")], secrets)
    name = unique("mint")
    world.task(agents, name, "bot", [{"namespace": target, "rules": secrets}])
    task = world.wait_phase(agents, name, "Active")
    client = as_token(world.kubeconfig, world.token(task))
    lasting = {
        "metadata": {
            "name": "forever",
            "annotations": {"kubernetes.io/service-account.name": "standing"},
        },
        "type": "kubernetes.io/service-account-token",
    }
    try:
        client.create(SECRETS, target, lasting)
        raise AssertionError("a service-account-token Secret was accepted")
    except KubeError as exc:
        assert exc.status == 403 and "per-task identity" in exc.reason
    # the policy itself works: an ordinary Secret is fine
    client.create(SECRETS, target, {"metadata": {"name": "fine"}, "stringData": {"a": "b"}})


def test_restart_with_tighter_guardrails_ends_live_grants(world, solo):
    agents, target = scene(world)
    cms = [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list"]}]
    world.policy(target, "cms", [(agents, "bot")], cms)
    first = solo()
    name = unique("cm")
    world.task(agents, name, "bot", [{"namespace": target, "rules": cms}])
    task = world.wait_phase(agents, name, "Active")
    first.kill()
    solo(args=["--forbid-resource", "configmaps"])
    got = world.wait_phase(agents, name, "Revoked")
    assert got["status"]["reason"] == "PolicyChanged" and "guardrails" in got["status"]["message"]
    assert world.task_objects(task) == []


# -- bad data stays local ----------------------------------------------------------------


def test_huge_durations_and_requests_are_refused(world, operator):
    agents, target = scene(world)
    bad_policy = status_code(
        lambda: world.policy(
            target, "forever", [(agents, "bot")], READ, maxTTL="99999999999999999999h"
        )
    )
    assert bad_policy == 422
    name = unique("huge")
    bad_task = status_code(
        lambda: world.task(agents, name, "bot", [{"namespace": target, "rules": READ}], ttl="9000h")
    )
    assert bad_task == 422
    # a request too large to evaluate cheaply is Denied at once; others go on
    big = [
        {
            "apiGroups": [""],
            "resources": ["pods", "configmaps"],
            "verbs": ["get", "list", "watch", "create", "patch", "update"],
            "resourceNames": [f"n{i}" for i in range(64)],
        }
    ] * 30
    world.task(agents, name, "bot", [{"namespace": target, "rules": big}])
    got = world.wait_phase(agents, name, "Denied", timeout=5)
    assert got["status"]["reason"] == "InvalidSpec" and "limit" in got["status"]["message"]
    assert active(world, agents, target)["status"]["phase"] == "Active"


def test_grants_only_into_watched_namespaces(world, solo):
    agents, target = scene(world)
    solo(args=["--namespace", agents])
    got = active(world, agents, target)
    assert got["status"]["reason"] == "Forbidden"


# -- no oracle -----------------------------------------------------------------------------


def requester_without_policy_access(world, ns: str, user: str):
    """A person who may create AgentTasks in `ns` and read nothing else."""
    world.allow(ns, f"{user}-tasks", [user], ["agenttasks"], ["create", "get"])
    return as_user(world.kubeconfig, user)


def ask(client, ns, name, target, rules):
    body = {
        "apiVersion": "agentaccess.io/v1alpha1",
        "kind": "AgentTask",
        "metadata": {"name": name},
        "spec": {
            "agent": "bot",
            "intent": "probe",
            "access": [{"namespace": target, "rules": rules}],
        },
    }
    client.create(AGENT_TASKS, ns, body)


def test_denials_do_not_reveal_namespaces_or_policies(world, operator):
    agents, target = scene(world)
    dev = requester_without_policy_access(world, agents, "dev")
    secret_ns = world.namespace("hidden")
    world.policy(secret_ns, "hidden-policy-name", [(agents, "other")], READ)
    answers = {}
    for ns in (secret_ns, "does-not-exist-anywhere"):
        name = unique("probe")
        ask(dev, agents, name, ns, READ)
        got = world.wait_phase(agents, name, "Denied")["status"]
        answers[ns] = (got["reason"], got["message"].replace(ns, "NS"))
    assert answers[secret_ns] == answers["does-not-exist-anywhere"]
    name = unique("probe")
    ask(dev, agents, name, target, [{**READ[0], "verbs": ["delete"]}])
    got = world.wait_phase(agents, name, "Denied")["status"]
    assert got["reason"] == "RuleNotAllowed" and "read" not in got["message"].split(":")[1]
    assert "closest" not in got["message"]
    line = audit_line(operator, name)
    assert f"{target}/read" in line["detail"]
    assert f"closest policy AccessPolicy {target}/read covers 0 of the 1" in line["detail"]


def test_a_denial_names_the_closest_policy_to_who_may_read_it(world, operator):
    agents, target = scene(world)
    world.policy(target, "wider", [(agents, "bot")], [{**READ[0], "verbs": ["get", "list"]}])
    rules = [{**READ[0], "verbs": ["get", "list", "delete"]}]
    world.task(agents, "too-much", "bot", [{"namespace": target, "rules": rules}])
    got = world.wait_phase(agents, "too-much", "Denied")["status"]
    assert got["reason"] == "RuleNotAllowed"
    assert "missing delete" in got["message"]
    # the admin who asked may read the policies: named, with what it lacks
    assert f"closest policy AccessPolicy {target}/wider covers 2 of the 3" in got["message"]
    other = world.namespace("other")
    world.policy(other, "others-only", [(agents, "someone-else")], READ)
    world.task(agents, "not-named", "bot", [{"namespace": other, "rules": READ}])
    got = world.wait_phase(agents, "not-named", "Denied")["status"]
    assert got["reason"] == "NoMatchingPolicy"
    assert f"{other}/others-only does not name {agents}/bot in its subjects" in got["message"]


# -- audit you can trust -------------------------------------------------------------------


def test_audit_marks_forged_events_and_escapes_control_characters(world, operator, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    agents, target = scene(world)
    task = active(world, agents, target, intent="read\x1b[2J\x1b]0;pwned\x07 logs")
    name = task["metadata"]["name"]
    world.kube.create(
        EVENTS,
        agents,
        {
            "metadata": {"generateName": "forged."},
            "involvedObject": {
                "apiVersion": "agentaccess.io/v1alpha1",
                "kind": "AgentTask",
                "name": name,
                "namespace": agents,
                "uid": task["metadata"]["uid"],
            },
            "reason": "Cancelled",
            "message": "an innocent-looking forged end",
            "type": "Normal",
            "source": {"component": "agent-access-operator"},
        },
    )
    exe = Path(sys.executable).with_name("agent-access-operator")
    out = subprocess.run(
        [str(exe), "audit", name, "-n", agents, "--audit-file", str(operator.audit_file)],
        env=dict(os.environ, KUBECONFIG=world.kubeconfig),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "\x1b" not in out and "\\x1b" in out
    forged = next(line for line in out.splitlines() if "forged end" in line)
    assert "event?" in forged
    granted = next(line for line in out.splitlines() if "PolicyAllowed" in line and "event" in line)
    assert "event?" not in granted


def test_lowering_max_ttl_shortens_live_grants(world, operator):
    """A grant issued under maxTTL 1h ends when the owner lowers maxTTL to 3s (from
    when it was granted), instead of keeping its hour."""
    agents, target = scene(world)
    task = active(world, agents, target, ttl="1h")
    name = task["metadata"]["name"]
    client = as_token(world.kubeconfig, world.token(task))
    world.kube.merge_patch(ACCESS_POLICIES, target, "read", {"spec": {"maxTTL": "3s"}})
    poll_status(lambda: list_pods_status(client, target), {401, 403}, 8)
    final = world.wait_phase(agents, name, {"Expired", "Revoked"})
    assert final["status"]["phase"] in ("Expired", "Revoked")


def test_protected_namespaces_are_never_granted_into(world, operator):
    agents, target = scene(world)
    task = active(world, agents, target)
    client = as_token(world.kubeconfig, world.token(task))
    from agent_access.kube import NAMESPACES

    world.kube.merge_patch(
        NAMESPACES, None, target, {"metadata": {"labels": {"agentaccess.io/protected": "true"}}}
    )
    poll_status(lambda: list_pods_status(client, target), {401, 403}, 5)
    got = world.wait_phase(agents, task["metadata"]["name"], "Revoked")
    assert got["status"]["reason"] == "PolicyChanged"
    later = active(world, agents, target)
    # answered like a namespace no policy governs: the label is not revealed
    assert later["status"]["reason"] == "NoMatchingPolicy"
    assert "protected" not in later["status"]["message"]
    line = audit_line(operator, later["metadata"]["uid"])
    assert "protected" in line["detail"]


def lease_writer(world, ns):
    """mallory, whom RBAC lets read, write and delete Leases in `ns`."""
    verbs = ["get", "update", "patch", "delete"]
    allow(world, ns, "mallory", ["leases"], verbs, group="coordination.k8s.io")
    return as_user(world.kubeconfig, "mallory")


def test_only_the_operator_writes_its_leader_lease(world, operator):
    """crds/ protects the default install's Lease (agent-access-system/agent-access-operator)
    from everyone but the operator and cluster admins."""
    from agent_access.kube import NAMESPACES
    from agent_access.leader import LEASES

    ns = "agent-access-system"
    if world.kube.get(NAMESPACES, None, ns) is None:
        world.kube.create(NAMESPACES, None, {"metadata": {"name": ns}})
    if world.kube.get(LEASES, ns, "agent-access-operator") is None:
        world.kube.create(
            LEASES,
            ns,
            {"metadata": {"name": "agent-access-operator"}, "spec": {"holderIdentity": "op"}},
        )
    mallory = lease_writer(world, ns)
    patch = {"spec": {"holderIdentity": "mallory"}}
    assert (
        status_code(lambda: mallory.merge_patch(LEASES, ns, "agent-access-operator", patch)) == 403
    )
    assert status_code(lambda: mallory.delete(LEASES, ns, "agent-access-operator")) == 403


def test_a_namespace_relabelled_during_issuance_is_rechecked(world, solo, kubeconfig, tmp_path):
    """The namespace leaves a ClusterAccessPolicy's selector while the grant is being
    issued (its RoleBinding is held up by a proxy): the new grant is re-checked and
    revoked at once instead of living on."""
    from agent_access.kube import NAMESPACES

    from .faultproxy import FaultProxy

    proxy = FaultProxy(kubeconfig, tmp_path, rate=0.0)
    proxy.delays[("POST", "/rolebindings")] = 1.5
    solo(config=proxy.kubeconfig)
    agents = world.namespace("relabel-agents")
    tier = unique("tier")
    target = world.namespace("relabel-target", labels={"tier": tier})
    world.service_account(agents, "bot")
    world.cluster_policy(unique("cap"), [(agents, "bot")], READ, {"matchLabels": {"tier": tier}})
    name = unique("mid")
    world.task(agents, name, "bot", [{"namespace": target, "rules": READ}])
    time.sleep(0.7)  # the operator is now waiting on its RoleBinding
    world.kube.merge_patch(NAMESPACES, None, target, {"metadata": {"labels": {"tier": None}}})
    got = world.wait_phase(agents, name, {"Revoked", "Denied"}, timeout=15)
    assert got["status"]["reason"] == "PolicyChanged", got["status"]


def test_a_leader_lease_anywhere_is_written_only_by_the_operator(world, solo):
    """Run with --leader-elect in any namespace (a local run defaults to `default`),
    the Lease carries the operator's label, and nobody else may rewrite or delete it:
    not a person with RBAC on leases, not a task's token whose policy allows leases."""
    from agent_access.leader import LEASES

    agents, target = scene(world)
    lease_id = unique("aao")
    op = solo(
        args=[
            "--leader-elect",
            "--leader-election-namespace",
            target,
            "--leader-election-id",
            lease_id,
            "--lease-duration",
            "3",
            "--lease-retry",
            "0.5",
        ]
    )
    wait_for(lambda: world.kube.get(LEASES, target, lease_id) is not None, 10)
    mallory = lease_writer(world, target)
    take = {"spec": {"holderIdentity": "mallory"}}
    assert status_code(lambda: mallory.merge_patch(LEASES, target, lease_id, take)) == 403
    assert status_code(lambda: mallory.delete(LEASES, target, lease_id)) == 403
    leases = [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "patch"]}
    ]
    world.policy(target, "leases", [(agents, "bot")], leases)
    name = unique("lease")
    world.task(agents, name, "bot", [{"namespace": target, "rules": leases}])
    token = as_token(world.kubeconfig, world.token(world.wait_phase(agents, name, "Active")))
    assert status_code(lambda: token.merge_patch(LEASES, target, lease_id, take)) == 403
    assert op.ready()


def test_a_burst_of_costly_requests_does_not_delay_others_revocations(world, operator):
    """A tenant writes its own many-rule policy and floods its namespace with requests
    just under the evaluation bound (~0.1 s of CPU each). Another namespace's cancel is
    still honoured at once: decisions never hold the queue revocations go through."""
    from concurrent.futures import ThreadPoolExecutor

    agents, target = scene(world)
    victim = active(world, agents, target)
    client = as_token(world.kubeconfig, world.token(victim))
    evil = world.namespace("evil")
    world.service_account(evil, "eve-bot")
    decoys = [
        {"apiGroups": ["x.example.com"], "resources": [f"d{i}"], "verbs": ["get"]}
        for i in range(60)
    ]
    world.policy(
        evil,
        "p",
        [(evil, "eve-bot")],
        [*decoys, {"apiGroups": ["*"], "resources": ["*"], "verbs": ["get"]}],
    )
    rule = {
        "apiGroups": [f"g{i}.example.com" for i in range(16)],
        "resources": [f"r{i}" for i in range(32)],
        "verbs": [f"v{i}" for i in range(16)],
        "resourceNames": ["n0", "n1"],
    }
    names = [unique("costly") for _ in range(100)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: world.task(evil, n, "eve-bot", [{"rules": [rule]}]), names))
    started = time.monotonic()
    world.kube.merge_patch(
        AGENT_TASKS, agents, victim["metadata"]["name"], {"spec": {"cancel": True}}
    )
    poll_status(lambda: list_pods_status(client, target), {401, 403}, 3)
    record_timing("cancel -> 403 during 100 costly decisions", time.monotonic() - started)
    # the burst is decided too (each one Denied, none crashed the operator)
    wait_for(
        lambda: all(
            (world.get_task(evil, n).get("status") or {}).get("phase") == "Denied" for n in names
        ),
        60,
        0.5,
        "the costly requests decided",
    )
    assert operator.ready()
