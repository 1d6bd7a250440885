"""Every denial reason and guardrail: phase Denied, the reason, a message naming the
offending rule, and nothing created."""

from __future__ import annotations

import pytest

from agent_access.kube import KubeError

from .cluster import unique, wait_for

WIDE_POLICY = [
    # A careless policy: the guardrails must hold whatever it says.
    {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
]
READ_PODS = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]


@pytest.fixture
def scene(world, operator):
    agents = world.namespace("agents")
    target = world.namespace("target")
    world.service_account(agents, "bot")
    world.policy(target, "careless", [(agents, "bot")], WIDE_POLICY)
    narrow = world.namespace("narrow")
    world.policy(narrow, "read", [(agents, "bot")], READ_PODS, requirePod=False)
    return agents, target, narrow


def deny(world, agents, access, agent="bot", **spec):
    name = unique("task")
    task = world.task(agents, name, agent, access, **spec)
    final = world.wait_phase(agents, name, {"Denied", "Active", "Failed"})
    st = final["status"]
    assert st["phase"] == "Denied", st
    assert world.task_objects(task) == []
    assert not st.get("serviceAccountName") and not st.get("tokenSecretName")
    cond = {c["type"]: c for c in st["conditions"]}["Granted"]
    assert cond["status"] == "False" and cond["reason"] == st["reason"]
    # the Event follows the status write by a few milliseconds
    wait_for(
        lambda: any(
            e["reason"] == st["reason"] and e["type"] == "Warning"
            for e in world.events(agents, name)
        ),
        5,
        what="the denial Event",
    )
    return st


def allow(world, agents, access, agent="bot", **spec):
    name = unique("task")
    world.task(agents, name, agent, access, **spec)
    final = world.wait_phase(agents, name, {"Denied", "Active", "Failed"})
    assert final["status"]["phase"] == "Active", final["status"]
    return final


GUARDRAILS = [
    (
        "escalate",
        {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles"], "verbs": ["escalate"]},
    ),
    (
        "bind",
        {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles"], "verbs": ["bind"]},
    ),
    (
        "impersonate",
        {"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["impersonate"]},
    ),
    (
        "serviceaccounts/token",
        {"apiGroups": [""], "resources": ["serviceaccounts/token"], "verbs": ["create"]},
    ),
    (
        "certificatesigningrequests",
        {
            "apiGroups": ["certificates.k8s.io"],
            "resources": ["certificatesigningrequests"],
            "verbs": ["create"],
        },
    ),
    (
        "roles",
        {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles"], "verbs": ["create"]},
    ),
    (
        "rolebindings",
        {
            "apiGroups": ["rbac.authorization.k8s.io"],
            "resources": ["rolebindings"],
            "verbs": ["patch"],
        },
    ),
    (
        "clusterroles",
        {
            "apiGroups": ["rbac.authorization.k8s.io"],
            "resources": ["clusterroles"],
            "verbs": ["update"],
        },
    ),
    (
        "clusterrolebindings",
        {
            "apiGroups": ["rbac.authorization.k8s.io"],
            "resources": ["clusterrolebindings"],
            "verbs": ["create"],
        },
    ),
    ("serviceaccounts", {"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["create"]}),
    (
        "mutatingwebhookconfigurations",
        {
            "apiGroups": ["admissionregistration.k8s.io"],
            "resources": ["mutatingwebhookconfigurations"],
            "verbs": ["delete"],
        },
    ),
    (
        "validatingwebhookconfigurations",
        {
            "apiGroups": ["admissionregistration.k8s.io"],
            "resources": ["validatingwebhookconfigurations"],
            "verbs": ["create"],
        },
    ),
    (
        "customresourcedefinitions",
        {
            "apiGroups": ["apiextensions.k8s.io"],
            "resources": ["customresourcedefinitions"],
            "verbs": ["deletecollection"],
        },
    ),
]


@pytest.mark.parametrize("word,rule", GUARDRAILS, ids=[g[0] for g in GUARDRAILS])
def test_guardrail_denies_forbidden(world, scene, word, rule):
    agents, target, _ = scene
    st = deny(world, agents, [{"namespace": target, "rules": [rule]}])
    assert st["reason"] == "Forbidden"
    assert word in st["message"] and target in st["message"]


def test_reading_roles_is_not_a_guardrail(world, scene):
    agents, target, _ = scene
    rule = {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles"], "verbs": ["get"]}
    allow(world, agents, [{"namespace": target, "rules": [rule]}])


@pytest.mark.parametrize("field", ["apiGroups", "resources", "verbs", "resourceNames"])
def test_wildcard_refused_at_apply_time(world, scene, field):
    agents, target, _ = scene
    rule = {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"], field: ["*"]}
    with pytest.raises(KubeError) as err:
        world.task(agents, unique("task"), "bot", [{"namespace": target, "rules": [rule]}])
    assert err.value.status == 422 and field in err.value.reason


def test_no_matching_policy(world, scene):
    agents, _, _ = scene
    elsewhere = world.namespace("nopolicy")
    st = deny(world, agents, [{"namespace": elsewhere, "rules": READ_PODS}])
    assert st["reason"] == "NoMatchingPolicy" and elsewhere in st["message"]
    assert "pods" in st["message"]


def test_policy_for_another_agent_does_not_match(world, scene):
    agents, _, narrow = scene
    world.service_account(agents, "other-bot")
    st = deny(world, agents, [{"namespace": narrow, "rules": READ_PODS}], agent="other-bot")
    assert st["reason"] == "NoMatchingPolicy"


def test_rule_not_allowed_names_the_rule_and_grants_nothing(world, scene):
    agents, target, narrow = scene
    # One entry fully allowed, one not: all or nothing.
    st = deny(
        world,
        agents,
        [
            {"namespace": target, "rules": READ_PODS},
            {
                "namespace": narrow,
                "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "delete"]}],
            },
        ],
    )
    assert st["reason"] == "RuleNotAllowed"
    assert narrow in st["message"] and "delete pods" in st["message"]


def test_resource_names_narrowing(world, operator):
    agents = world.namespace("agents")
    target = world.namespace("target")
    world.service_account(agents, "bot")
    get_configmaps = {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}
    named = {**get_configmaps, "resourceNames": ["app-config"]}
    world.policy(target, "one-config", [(agents, "bot")], [named])
    st = deny(world, agents, [{"namespace": target, "rules": [get_configmaps]}])
    assert st["reason"] == "RuleNotAllowed"
    allow(world, agents, [{"namespace": target, "rules": [named]}])


def test_agent_not_found(world, scene):
    agents, _, narrow = scene
    st = deny(world, agents, [{"namespace": narrow, "rules": READ_PODS}], agent="ghost")
    assert st["reason"] == "AgentNotFound" and "ghost" in st["message"]


def test_pod_not_found(world, scene):
    agents, _, narrow = scene
    st = deny(world, agents, [{"namespace": narrow, "rules": READ_PODS}], podName="nope")
    assert st["reason"] == "PodNotFound" and "nope" in st["message"]


def test_pod_running_as_another_service_account(world, scene):
    agents, _, narrow = scene
    world.service_account(agents, "someone-else")
    world.pod(agents, "foreign", "someone-else")
    st = deny(world, agents, [{"namespace": narrow, "rules": READ_PODS}], podName="foreign")
    assert st["reason"] == "InvalidSpec" and "someone-else" in st["message"]


def test_target_namespace_does_not_exist(world, scene):
    agents, _, _ = scene
    st = deny(world, agents, [{"namespace": "does-not-exist-x1", "rules": READ_PODS}])
    # answered like a namespace no policy governs: the requester learns nothing more
    assert st["reason"] == "NoMatchingPolicy" and "does-not-exist-x1" in st["message"]


def test_require_pod(world, operator):
    agents = world.namespace("agents")
    target = world.namespace("target")
    world.service_account(agents, "bot")
    world.policy(target, "pod-only", [(agents, "bot")], READ_PODS, requirePod=True)
    st = deny(world, agents, [{"namespace": target, "rules": READ_PODS}])
    assert st["reason"] == "NoMatchingPolicy" and "podName" in st["message"]
    world.pod(agents, "worker", "bot")
    allow(world, agents, [{"namespace": target, "rules": READ_PODS}], podName="worker")


def test_duplicate_namespace_is_invalid(world, scene):
    agents, _, narrow = scene
    st = deny(
        world,
        agents,
        [{"namespace": narrow, "rules": READ_PODS}, {"namespace": narrow, "rules": READ_PODS}],
    )
    assert st["reason"] == "InvalidSpec" and "twice" in st["message"]


@pytest.mark.parametrize(
    "spec,field",
    [
        ({"intent": ""}, "intent"),
        ({"intent": "   "}, "intent"),
        ({"ttl": "ten minutes"}, "ttl"),
        ({"access": []}, "access"),
    ],
)
def test_schema_refuses_bad_input(world, scene, spec, field):
    agents, _, narrow = scene
    body = {"access": [{"namespace": narrow, "rules": READ_PODS}], **spec}
    with pytest.raises(KubeError) as err:
        world.task(agents, unique("task"), "bot", body.pop("access"), **body)
    assert err.value.status == 422 and field in err.value.reason
