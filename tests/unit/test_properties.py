"""Property tests: a grant is never wider than the matching policies, never holds a
guardrail verb or resource, and never outlives a used policy's maxTTL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from agent_access.engine import Granted, Policy, World, decide
from agent_access.rules import DEFAULT_GUARDRAILS, Rule, rule_covers

GROUPS = ["", "apps", "batch", "rbac.authorization.k8s.io", "certificates.k8s.io"]
RESOURCES = [
    "pods",
    "pods/log",
    "secrets",
    "deployments",
    "roles",
    "rolebindings",
    "serviceaccounts",
    "serviceaccounts/token",
    "certificatesigningrequests",
    "configmaps",
    "jobs",
]
VERBS = [
    "get",
    "list",
    "watch",
    "create",
    "update",
    "patch",
    "delete",
    "escalate",
    "bind",
    "impersonate",
]
NAMES = ["a", "b", "c"]
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def subset(values, min_size=1, wildcard=False):
    pool = [*values, "*"] if wildcard else values
    return st.lists(st.sampled_from(pool), min_size=min_size, max_size=3, unique=True)


def rules(wildcard):
    return st.builds(
        lambda g, r, v, n: {"apiGroups": g, "resources": r, "verbs": v, "resourceNames": n},
        subset(GROUPS, wildcard=wildcard),
        subset(RESOURCES, wildcard=wildcard),
        subset(VERBS, wildcard=wildcard),
        subset(NAMES, min_size=0, wildcard=False),
    )


policies = st.lists(
    st.builds(
        lambda name, ns, rs, ttl: Policy(
            name=name,
            namespace=ns,
            subjects=frozenset({("agents", "bot")}),
            rules=tuple(Rule.from_dict(r) for r in rs),
            max_ttl=timedelta(minutes=ttl),
        ),
        st.sampled_from(["p1", "p2", "p3"]),
        st.sampled_from(["ns1", "ns2"]),
        st.lists(rules(wildcard=True), min_size=1, max_size=3),
        st.integers(1, 120),
    ),
    max_size=4,
)
requests = st.lists(
    st.builds(
        lambda ns, rs: {"namespace": ns, "rules": rs},
        st.sampled_from(["ns1", "ns2"]),
        st.lists(rules(wildcard=False), min_size=1, max_size=3),
    ),
    min_size=1,
    max_size=2,
    unique_by=lambda e: e["namespace"],
)


@settings(max_examples=400, deadline=None)
@given(policies, requests, st.integers(1, 300))
def test_grants_stay_within_policies_guardrails_and_ttl(pols, access, ttl_minutes):
    spec = {"agent": "bot", "intent": "x", "ttl": f"{ttl_minutes}m", "access": access}
    decision = decide("agents", spec, World(policies=pols, namespaces={"ns1": {}, "ns2": {}}), NOW)
    if not isinstance(decision, Granted):
        return
    used = {p.key: p for p in decision.policies}
    for grant in decision.grants:
        ceiling = [r for p in pols if p.namespace == grant.namespace for r in p.rules]
        for rule in grant.rules:
            assert DEFAULT_GUARDRAILS.violation(rule) is None
            for atom in rule.atoms():
                assert any(rule_covers(c, atom) for c in ceiling), atom
    assert decision.ttl <= timedelta(minutes=ttl_minutes)
    for p in used.values():
        assert decision.expires_at - decision.granted_at <= p.max_ttl
    # and every used policy really applies to a granted namespace
    assert all(p.namespace in {g.namespace for g in decision.grants} for p in used.values())


CONDITION_POOL = [
    "true",
    "false",
    "namespace.metadata.name == 'ns1'",
    "namespace.metadata.labels[?'tier'] == optional.of('prod')",
    "duration(task.spec.ttl) <= duration('30m')",
    "now.getHours() >= 12",
    "requester == null || requester.username == 'alice'",
    "pod == null",
    "namespace.metadata.labels['missing'] == 'x'",  # errs: counts as false
]


@settings(max_examples=300, deadline=None)
@given(
    policies,
    requests,
    st.integers(1, 300),
    st.lists(st.sampled_from(CONDITION_POOL), min_size=1, max_size=2),
    st.integers(0, 3),
    st.integers(0, 23),
)
def test_conditions_only_narrow_what_rules_allow(pols, access, ttl, exprs, which, hour):
    """Adding conditions to a policy never grants anything it would not grant without
    them: whatever is granted with conditions is granted without, the same way."""
    from dataclasses import replace

    from agent_access.conditions import compile_condition

    conditions = tuple(compile_condition(e) for e in exprs)
    with_conditions = [
        replace(p, conditions=conditions) if i == which else p for i, p in enumerate(pols)
    ]
    spec = {"agent": "bot", "intent": "x", "ttl": f"{ttl}m", "access": access}
    now = NOW.replace(hour=hour)
    namespaces = {"ns1": {"tier": "prod"}, "ns2": {}}
    narrowed = decide("agents", spec, World(policies=with_conditions, namespaces=namespaces), now)
    plain = decide("agents", spec, World(policies=pols, namespaces=namespaces), now)
    if isinstance(narrowed, Granted):
        assert isinstance(plain, Granted)
        assert narrowed.grants == plain.grants
        assert {p.key for p in narrowed.policies} <= {p.key for p in plain.policies}
        for p in narrowed.policies:  # and only policies whose conditions hold were used
            assert p.key not in {q.key for q in with_conditions if q.conditions} or all(
                e not in ("false",) for e in exprs
            )
