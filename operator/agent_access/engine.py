"""The policy engine: an AgentTask request + the policies that exist -> a decision.

Purely computational, no side effects. The clock is passed in; facts about the
cluster (policies, namespaces, agent, pod) are gathered by the caller into a
`World`. The engine is all-or-nothing: any uncovered or forbidden rule denies the
whole request.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from .durations import DurationError, parse_duration
from .model import DEFAULT_MAX_TTL, DEFAULT_TTL, Reason
from .rules import DEFAULT_GUARDRAILS, Guardrails, Rule, parse_rules, rule_covers

# ---------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class AccessEntry:
    namespace: str
    rules: tuple[Rule, ...]


@dataclass(frozen=True)
class TaskSpec:
    namespace: str
    agent: str
    intent: str
    ttl: timedelta
    pod_name: str | None
    cancel: bool
    audiences: tuple[str, ...]
    access: tuple[AccessEntry, ...]

    @property
    def target_namespaces(self) -> tuple[str, ...]:
        return tuple(e.namespace for e in self.access)


class SpecError(ValueError):
    """The spec cannot be evaluated as written (InvalidSpec)."""


def parse_task_spec(namespace: str, spec: Mapping[str, Any]) -> TaskSpec:
    """Validate and normalise an AgentTask spec; raise SpecError saying what to fix."""
    agent = spec.get("agent")
    if not isinstance(agent, str) or not agent:
        raise SpecError("spec.agent is required: the ServiceAccount the agent runs as")
    intent = spec.get("intent")
    if not isinstance(intent, str) or not intent.strip():
        raise SpecError("spec.intent is required and must not be empty")
    try:
        ttl = parse_duration(spec.get("ttl") or DEFAULT_TTL)
    except DurationError as exc:
        raise SpecError(f"spec.ttl: {exc}") from None
    if ttl < timedelta(seconds=1):
        raise SpecError("spec.ttl must be at least 1s")
    access_raw = spec.get("access") or []
    if not access_raw:
        raise SpecError("spec.access needs at least one entry")
    entries: list[AccessEntry] = []
    seen: set[str] = set()
    for i, raw in enumerate(access_raw):
        target = raw.get("namespace") or namespace
        if target in seen:
            raise SpecError(
                f"spec.access[{i}]: namespace {target!r} is listed twice; "
                "put all its rules in one entry"
            )
        seen.add(target)
        rules = parse_rules(raw.get("rules"))
        if not rules:
            raise SpecError(f"spec.access[{i}] ({target}): rules needs at least one rule")
        for j, rule in enumerate(rules):
            where = f"spec.access[{i}].rules[{j}]"
            if not rule.api_groups:
                raise SpecError(f'{where}: apiGroups is required ("" is the core group)')
            if not rule.resources:
                raise SpecError(f"{where}: resources is required")
            if not rule.verbs:
                raise SpecError(f"{where}: verbs is required")
        entries.append(AccessEntry(namespace=target, rules=rules))
    pod_name = spec.get("podName") or None
    return TaskSpec(
        namespace=namespace,
        agent=agent,
        intent=intent,
        ttl=ttl,
        pod_name=pod_name,
        cancel=bool(spec.get("cancel")),
        audiences=tuple(spec.get("audiences") or ()),
        access=tuple(entries),
    )


@dataclass(frozen=True)
class Policy:
    """An AccessPolicy (namespace set) or a ClusterAccessPolicy (selector set)."""

    name: str
    namespace: str | None
    subjects: frozenset[tuple[str, str]]
    rules: tuple[Rule, ...]
    max_ttl: timedelta
    require_pod: bool = False
    namespace_selector: Mapping[str, Any] | None = None
    resource_version: str = ""

    @property
    def key(self) -> str:
        """How status and messages name it: ns/name, or name for a cluster policy."""
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

    @property
    def kind(self) -> str:
        return "AccessPolicy" if self.namespace else "ClusterAccessPolicy"

    def governs(self, target: str, labels: Mapping[str, str]) -> bool:
        if self.namespace is not None:
            return self.namespace == target
        return selector_matches(self.namespace_selector or {}, labels)


def parse_policy(body: Mapping[str, Any]) -> Policy:
    """Turn a policy object into a Policy; raise SpecError if it is unusable."""
    meta = body.get("metadata", {})
    spec = body.get("spec") or {}
    cluster = body.get("kind") == "ClusterAccessPolicy"
    try:
        max_ttl = parse_duration(spec.get("maxTTL") or DEFAULT_MAX_TTL)
    except DurationError as exc:
        raise SpecError(f"spec.maxTTL: {exc}") from None
    return Policy(
        name=meta.get("name", ""),
        namespace=None if cluster else meta.get("namespace"),
        subjects=frozenset(
            (s.get("namespace", ""), s.get("serviceAccount", ""))
            for s in spec.get("subjects") or ()
        ),
        rules=parse_rules(spec.get("rules")),
        max_ttl=max_ttl,
        require_pod=bool(spec.get("requirePod")),
        namespace_selector=spec.get("namespaceSelector") if cluster else None,
        resource_version=str(meta.get("resourceVersion", "")),
    )


def selector_matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A standard LabelSelector; an empty selector matches nothing (API.md)."""
    match_labels = selector.get("matchLabels") or {}
    expressions = selector.get("matchExpressions") or []
    if not match_labels and not expressions:
        return False
    if any(labels.get(k) != v for k, v in match_labels.items()):
        return False
    for expr in expressions:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        present = key in labels
        if op == "In" and not (present and labels[key] in values):
            return False
        if op == "NotIn" and present and labels[key] in values:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            return False
    return True


@dataclass(frozen=True)
class PodFacts:
    name: str
    uid: str
    service_account: str
    phase: str
    deleting: bool


@dataclass(frozen=True)
class World:
    """What the cluster looks like, gathered by the caller before deciding."""

    policies: Sequence[Policy] = ()
    #: Existing namespaces and their labels.
    namespaces: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    agent_exists: bool = True
    #: The pod named by spec.podName, or None when it does not exist.
    pod: PodFacts | None = None


# ---------------------------------------------------------------------------
# Outputs


@dataclass(frozen=True)
class Granted:
    grants: tuple[AccessEntry, ...]
    policies: tuple[Policy, ...]
    ttl: timedelta
    granted_at: datetime
    expires_at: datetime

    @property
    def policy_keys(self) -> list[str]:
        return [p.key for p in self.policies]

    @property
    def rule_count(self) -> int:
        return sum(len(g.rules) for g in self.grants)

    def summary(self) -> str:
        where = ", ".join(
            f"{len(g.rules)} rule{'s' if len(g.rules) != 1 else ''} in {g.namespace}"
            for g in self.grants
        )
        until = self.expires_at.strftime("%Y-%m-%dT%H:%M:%SZ")
        return f"granted {where} until {until} by {', '.join(self.policy_keys)}"


@dataclass(frozen=True)
class Denied:
    reason: Reason
    message: str


Decision = Granted | Denied


# ---------------------------------------------------------------------------
# Evaluation


def check_guardrails(spec: TaskSpec, guardrails: Guardrails) -> Denied | None:
    for entry in spec.access:
        outside = guardrails.namespace_violation(entry.namespace)
        if outside:
            return Denied(Reason.FORBIDDEN, f"namespace {entry.namespace}: {outside}")
        for rule in entry.rules:
            why = guardrails.violation(rule)
            if why:
                return Denied(
                    Reason.FORBIDDEN,
                    f"namespace {entry.namespace}: rule [{rule.describe()}] is forbidden: {why}",
                )
    return None


def _atom_text(atom: tuple[str, str, str, str | None]) -> str:
    group, resource, verb, name = atom
    target = f"{group}/{resource}" if group else resource
    return f"{verb} {target}" + (f" {name}" if name else "")


def check_coverage(
    spec: TaskSpec,
    policies: Sequence[Policy],
    namespaces: Mapping[str, Mapping[str, str]],
) -> tuple[tuple[Policy, ...], Denied | None]:
    """Is every requested rule covered by the policies that apply to its namespace?

    Returns the policies that contributed (each covers at least one requested
    atom), and a denial naming the namespace and the first uncovered rule.
    """
    subject = (spec.namespace, spec.agent)
    used: dict[str, Policy] = {}
    for entry in spec.access:
        labels = namespaces.get(entry.namespace, {})
        naming = [
            p for p in policies if subject in p.subjects and p.governs(entry.namespace, labels)
        ]
        applicable = [p for p in naming if spec.pod_name or not p.require_pod]
        if not applicable:
            hint = ""
            if naming:
                keys = ", ".join(p.key for p in naming)
                hint = f"; {keys} require spec.podName"
            return (), Denied(
                Reason.NO_MATCHING_POLICY,
                f"namespace {entry.namespace}: no AccessPolicy or ClusterAccessPolicy lets "
                f"{spec.namespace}/{spec.agent} request [{entry.rules[0].describe()}]{hint}",
            )
        for rule in entry.rules:
            missing = []
            for atom in rule.atoms():
                covering = [p for p in applicable if any(rule_covers(c, atom) for c in p.rules)]
                if not covering:
                    missing.append(atom)
                for p in covering:
                    used.setdefault(p.key, p)
            if missing:
                keys = ", ".join(p.key for p in applicable)
                shown = "; ".join(_atom_text(a) for a in missing[:5])
                more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
                return (), Denied(
                    Reason.RULE_NOT_ALLOWED,
                    f"namespace {entry.namespace}: rule [{rule.describe()}] is not covered by "
                    f"{keys}: missing {shown}{more}",
                )
    return tuple(sorted(used.values(), key=lambda p: p.key)), None


def floor_seconds(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(microsecond=0)


def evaluate(
    spec: TaskSpec,
    world: World,
    now: datetime,
    guardrails: Guardrails = DEFAULT_GUARDRAILS,
) -> Decision:
    """Decide a request. Guardrails first, then facts, then policy coverage and TTL."""
    denied = check_guardrails(spec, guardrails)
    if denied:
        return denied
    for target in spec.target_namespaces:
        if target not in world.namespaces:
            return Denied(Reason.INVALID_SPEC, f"target namespace {target!r} does not exist")
    if not world.agent_exists:
        return Denied(
            Reason.AGENT_NOT_FOUND,
            f"ServiceAccount {spec.agent!r} does not exist in namespace {spec.namespace}",
        )
    if spec.pod_name:
        pod = world.pod
        if pod is None or pod.deleting:
            return Denied(
                Reason.POD_NOT_FOUND,
                f"pod {spec.pod_name!r} does not exist in namespace {spec.namespace}",
            )
        if pod.service_account != spec.agent:
            return Denied(
                Reason.INVALID_SPEC,
                f"pod {spec.pod_name!r} runs as ServiceAccount {pod.service_account!r}, "
                f"not the agent {spec.agent!r}",
            )
        if pod.phase in ("Succeeded", "Failed"):
            return Denied(
                Reason.INVALID_SPEC, f"pod {spec.pod_name!r} has already finished ({pod.phase})"
            )
    used, denied = check_coverage(spec, world.policies, world.namespaces)
    if denied:
        return denied
    ttl = min([spec.ttl, *(p.max_ttl for p in used)])
    ttl = timedelta(seconds=max(1, int(ttl.total_seconds())))
    granted_at = floor_seconds(now)
    return Granted(
        grants=spec.access,
        policies=used,
        ttl=ttl,
        granted_at=granted_at,
        expires_at=granted_at + ttl,
    )


def decide(
    namespace: str,
    raw_spec: Mapping[str, Any],
    world: World,
    now: datetime,
    guardrails: Guardrails = DEFAULT_GUARDRAILS,
) -> Decision:
    """Parse then evaluate; an unparseable spec is Denied InvalidSpec."""
    try:
        spec = parse_task_spec(namespace, raw_spec)
    except SpecError as exc:
        return Denied(Reason.INVALID_SPEC, str(exc))
    return evaluate(spec, world, now, guardrails)


def reevaluate(
    spec: TaskSpec,
    policies: Sequence[Policy],
    namespaces: Mapping[str, Mapping[str, str]],
    previous_policies: Sequence[str],
) -> Denied | None:
    """After a policy change: None while the grant is still fully allowed.

    The reason is PolicyDeleted when a policy the grant relied on no longer
    exists, PolicyChanged otherwise.
    """
    _, denied = check_coverage(spec, policies, namespaces)
    if denied is None:
        return None
    existing = {p.key for p in policies}
    gone = [k for k in previous_policies if k not in existing]
    reason = Reason.POLICY_DELETED if gone else Reason.POLICY_CHANGED
    prefix = f"policy {', '.join(gone)} deleted; " if gone else "policies changed; "
    return Denied(reason, prefix + denied.message)
