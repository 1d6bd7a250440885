"""The policy engine: an AgentTask request + the policies that exist -> a decision.

Purely computational, no side effects. The clock is passed in; facts about the
cluster (policies, namespaces, agent, pod) are gathered by the caller into a
`World`. The engine is all-or-nothing: any uncovered or forbidden rule denies the
whole request.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from .conditions import (
    NOT_HOLDING,
    Condition,
    ConditionError,
    Failure,
    activation,
    compile_conditions,
    for_namespace,
    holds,
    namespace_object,
    task_object,
)
from .durations import DurationError, parse_duration
from .model import (
    ANNOTATION_REQUESTER_GROUPS,
    ANNOTATION_REQUESTER_UID,
    ANNOTATION_REQUESTER_USERNAME,
    DEFAULT_APPROVAL_TIMEOUT,
    DEFAULT_MAX_TTL,
    DEFAULT_TTL,
    LABEL_PROTECTED,
    MAX_COVERAGE_CHECKS,
    MAX_REQUEST_ATOMS,
    MAX_STAGES,
    Reason,
)
from .patterns import intent_matches, pattern_problem
from .rules import DEFAULT_GUARDRAILS, Guardrails, Rule, parse_rules, rule_covers

SA_PREFIX = "system:serviceaccount:"

# ---------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True, slots=True)
class AccessEntry:
    namespace: str
    rules: tuple[Rule, ...]
    #: a policy's named rule set asked for instead of rules (empty until resolved)
    preset: str | None = None


@dataclass(frozen=True, slots=True)
class Requester:
    """Who created the task, as the API server recorded it at admission."""

    username: str = ""
    uid: str = ""
    groups: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"username": self.username, "uid": self.uid, "groups": list(self.groups)}

    def service_account(self) -> tuple[str, str] | None:
        """(namespace, name) when the requester is a ServiceAccount."""
        if not self.username.startswith(SA_PREFIX):
            return None
        parts = self.username[len(SA_PREFIX) :].split(":")
        return (parts[0], parts[1]) if len(parts) == 2 else None


def requester_of(metadata: Mapping[str, Any]) -> Requester | None:
    """The requester stamped at admission (annotations no client can set); None when
    the admission policies are not installed."""
    annotations = metadata.get("annotations") or {}
    if not isinstance(annotations, Mapping):
        return None
    username = annotations.get(ANNOTATION_REQUESTER_USERNAME)
    if not isinstance(username, str) or not username:
        return None
    uid = annotations.get(ANNOTATION_REQUESTER_UID)
    try:  # a JSON array of strings, written by the admission policy
        groups = json.loads(annotations.get(ANNOTATION_REQUESTER_GROUPS) or "[]")
    except (TypeError, ValueError):
        groups = []
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        groups = []  # fail closed: no group-based requester rule matches
    return Requester(
        username=username,
        uid=uid if isinstance(uid, str) else "",
        groups=tuple(groups),
    )


@dataclass(frozen=True, slots=True)
class TaskSpec:
    namespace: str
    agent: str
    intent: str
    ttl: timedelta
    pod_name: str | None
    cancel: bool
    audiences: tuple[str, ...]
    access: tuple[AccessEntry, ...]
    requester: Requester | None = None
    #: decide, issue nothing (Completed/DryRun, or the real denial)
    dry_run: bool = False
    #: Staged tasks: every stage's name, the current one's index (-1: not staged; its
    #: access and ttl are `access` and `ttl`), and the whole task's ttl cap.
    stages: tuple[str, ...] = ()
    stage_index: int = -1
    task_ttl: timedelta | None = None
    #: the task's name, uid and labels (what conditions may read of its metadata)
    name: str = field(default="", compare=False)
    uid: str = field(default="", compare=False)
    labels: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    @property
    def staged(self) -> bool:
        return self.stage_index >= 0

    @property
    def stage(self) -> str | None:
        return self.stages[self.stage_index] if self.staged else None

    @property
    def last_stage(self) -> bool:
        return self.staged and self.stage_index == len(self.stages) - 1

    @property
    def target_namespaces(self) -> tuple[str, ...]:
        return tuple(e.namespace for e in self.access)

    @property
    def atom_count(self) -> int:
        return sum(r.atom_count for e in self.access for r in e.rules)


class SpecError(ValueError):
    """The spec cannot be evaluated as written (InvalidSpec)."""


def parse_task_spec(
    namespace: str, spec: Mapping[str, Any], requester: Requester | None = None
) -> TaskSpec:
    """Validate and normalise an AgentTask spec; raise SpecError saying what to fix.

    Total: any malformed input (wrong types included) is a SpecError, never a crash.
    """
    try:
        return _parse_task_spec(namespace, spec, requester)
    except SpecError:
        raise
    except Exception as exc:  # hostile shapes: lists for maps, numbers for strings, ...
        raise SpecError(f"spec is malformed ({type(exc).__name__})") from None


def _strings(raw: Any, where: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
        raise SpecError(f"{where} must be a list of strings")
    return tuple(raw)


def _parse_task_spec(
    namespace: str, spec: Mapping[str, Any], requester: Requester | None
) -> TaskSpec:
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
    stages_raw = spec.get("stages")
    stage_names: tuple[str, ...] = ()
    stage_index = -1
    task_ttl: timedelta | None = None
    if stages_raw is not None:
        if spec.get("access"):
            raise SpecError("give spec.access or spec.stages, not both")
        if not isinstance(stages_raw, list) or not 1 <= len(stages_raw) <= MAX_STAGES:
            raise SpecError(f"spec.stages needs 1 to {MAX_STAGES} stages")
        names = []
        for i, stage in enumerate(stages_raw):
            name = stage.get("name") if isinstance(stage, Mapping) else None
            if not isinstance(name, str) or not name:
                raise SpecError(f"spec.stages[{i}].name is required")
            if name in names:
                raise SpecError(f"spec.stages[{i}]: the name {name!r} is used twice")
            names.append(name)
        stage_names = tuple(sys.intern(n) for n in names)
        current = spec.get("stage") or stage_names[0]
        if current not in stage_names:
            raise SpecError(f"spec.stage {current!r} is not one of spec.stages")
        stage_index = stage_names.index(current)
        chosen = stages_raw[stage_index]
        task_ttl = ttl
        if chosen.get("ttl"):
            try:
                ttl = min(parse_duration(chosen["ttl"]), task_ttl)
            except DurationError as exc:
                raise SpecError(f"spec.stages[{stage_index}].ttl: {exc}") from None
        entries = _parse_access(
            namespace, chosen.get("access"), f"spec.stages[{stage_index}].access"
        )
    else:
        entries = _parse_access(namespace, spec.get("access"), "spec.access")
    dry_run = spec.get("dryRun", False)
    if not isinstance(dry_run, bool):
        raise SpecError("spec.dryRun must be true or false")
    pod_name = spec.get("podName") or None
    if pod_name is not None and not isinstance(pod_name, str):
        raise SpecError("spec.podName must be a string")
    return TaskSpec(
        namespace=sys.intern(namespace),
        agent=sys.intern(agent),
        intent=intent,
        ttl=ttl,
        pod_name=pod_name,
        cancel=spec.get("cancel") is True,
        audiences=_strings(spec.get("audiences"), "spec.audiences"),
        access=tuple(entries),
        requester=requester,
        dry_run=dry_run,
        stages=stage_names,
        stage_index=stage_index,
        task_ttl=task_ttl,
    )


def _parse_access(namespace: str, access_raw: Any, where: str) -> list[AccessEntry]:
    if not access_raw:
        raise SpecError(f"{where} needs at least one entry")
    entries: list[AccessEntry] = []
    seen: set[str] = set()
    if not isinstance(access_raw, list):
        raise SpecError(f"{where} must be a list")
    for i, raw in enumerate(access_raw):
        target = raw.get("namespace") or namespace
        if not isinstance(target, str):
            raise SpecError(f"{where}[{i}].namespace must be a string")
        if target in seen:
            raise SpecError(
                f"{where}[{i}]: namespace {target!r} is listed twice; "
                "put all its rules in one entry"
            )
        seen.add(target)
        preset = raw.get("preset")
        if preset is not None:
            if not isinstance(preset, str) or not preset:
                raise SpecError(f"{where}[{i}].preset must be a preset's name")
            if raw.get("rules"):
                raise SpecError(f"{where}[{i}] ({target}): give rules or a preset, not both")
            entries.append(AccessEntry(namespace=sys.intern(target), rules=(), preset=preset))
            continue
        rules = parse_rules(raw.get("rules"))
        if not rules:
            raise SpecError(
                f"{where}[{i}] ({target}): rules needs at least one rule (or name a preset)"
            )
        for j, rule in enumerate(rules):
            at = f"{where}[{i}].rules[{j}]"
            if not rule.api_groups:
                raise SpecError(f'{at}: apiGroups is required ("" is the core group)')
            if not rule.resources:
                raise SpecError(f"{at}: resources is required")
            if not rule.verbs:
                raise SpecError(f"{at}: verbs is required")
        entries.append(AccessEntry(namespace=sys.intern(target), rules=rules))
    return entries


def parse_task(task: Mapping[str, Any]) -> TaskSpec:
    """A task's spec with the requester stamped at admission; SpecError if unusable."""
    meta = task.get("metadata") or {}
    spec = parse_task_spec(meta.get("namespace", ""), task.get("spec") or {}, requester_of(meta))
    labels = meta.get("labels")
    pairs = (
        tuple(sorted((str(k), str(v)) for k, v in labels.items()))
        if isinstance(labels, Mapping)
        else ()
    )
    return replace(
        spec, name=str(meta.get("name") or ""), uid=str(meta.get("uid") or ""), labels=pairs
    )


@dataclass(frozen=True, slots=True)
class ApprovalRule:
    """A policy's `approval`: how many distinct approvers, who may approve, how long
    a task may wait (from its creation)."""

    required: int
    #: (kind, namespace, name) as in `requesters`: User, Group or ServiceAccount.
    approvers: frozenset[tuple[str, str, str]]
    timeout: timedelta


@dataclass(frozen=True, slots=True)
class Policy:
    """An AccessPolicy (namespace set) or a ClusterAccessPolicy (selector set)."""

    name: str
    namespace: str | None
    subjects: frozenset[tuple[str, str]]
    rules: tuple[Rule, ...]
    max_ttl: timedelta
    require_pod: bool = False
    namespace_selector: Mapping[str, Any] | None = None
    resource_version: str = field(default="", compare=False)
    #: (kind, namespace, name) of who may create tasks this policy covers; empty: anyone.
    requesters: frozenset[tuple[str, str, str]] = frozenset()
    allowed_audiences: frozenset[str] = frozenset()
    #: Human approval a task it covers needs first (None: none).
    approval: ApprovalRule | None = None
    #: Named rule sets tasks may ask for by name (part of the ceiling).
    presets: Mapping[str, tuple[Rule, ...]] = field(default_factory=dict)
    #: The intent of every task it covers must match this (RE2 syntax).
    intent_pattern: str | None = None
    #: Live tasks per agent this policy may cover at once (None: no limit).
    max_active: int | None = None
    #: CEL conditions, all of which must hold (see conditions.py).
    conditions: tuple[Condition, ...] = ()
    #: Rules marked `recheck: true`: a call needing one is re-evaluated at call time by
    #: the authorization webhook (gate.py).
    recheck_rules: tuple[Rule, ...] = ()
    #: A grant with no call for this long ends (Expired / IdleTimeout).
    idle_timeout: timedelta | None = None
    #: Why the policy matches nothing (a condition or pattern that does not
    #: compile, a malformed spec): (reason, message), reported as Ready=False.
    problem: tuple[str, str] | None = None
    generation: int = 0
    uid: str = field(default="", compare=False)
    #: the Ready condition the policy's status shows now: (status, reason, message,
    #: observedGeneration, lastTransitionTime); not part of what the policy says
    shown: tuple[str, str, str, int, str] | None = field(default=None, compare=False)

    @property
    def ceiling(self) -> tuple[Rule, ...]:
        """`rules` and every preset's rules: what this policy may grant."""
        if not self.presets:
            return self.rules
        return self.rules + tuple(r for name in sorted(self.presets) for r in self.presets[name])

    def allows_requester(self, requester: Requester | None) -> bool:
        if not self.requesters:
            return True
        return requester is not None and requester_listed(self.requesters, requester)

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


def requester_listed(listed: frozenset[tuple[str, str, str]], requester: Requester) -> bool:
    for kind, namespace, name in listed:
        if kind == "User" and requester.username == name:
            return True
        if kind == "Group" and name in requester.groups:
            return True
        if kind == "ServiceAccount" and requester.username == f"{SA_PREFIX}{namespace}:{name}":
            return True
    return False


def parse_policy(body: Mapping[str, Any]) -> Policy:
    """Turn a policy object into a Policy; raise SpecError if it is unusable.

    Total: any malformed input is a SpecError, so one hostile policy never breaks a
    decision or re-evaluation that lists it with others.
    """
    try:
        return _parse_policy(body)
    except SpecError:
        raise
    except Exception as exc:
        raise SpecError(f"policy is malformed ({type(exc).__name__})") from None


def broken_policy(body: Mapping[str, Any], reason: str, message: str) -> Policy:
    """A policy that cannot be used: it matches nothing, and says why (Ready=False)."""
    meta = body.get("metadata") or {}
    cluster = body.get("kind") == "ClusterAccessPolicy"
    return Policy(
        name=str(meta.get("name") or ""),
        namespace=None if cluster else str(meta.get("namespace") or ""),
        subjects=frozenset(),
        rules=(),
        max_ttl=timedelta(0),
        problem=(reason, message),
        generation=_int(meta.get("generation")),
        uid=str(meta.get("uid") or ""),
        resource_version=str(meta.get("resourceVersion", "")),
        shown=shown_ready(body),
    )


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def shown_ready(body: Mapping[str, Any]) -> tuple[str, str, str, int, str] | None:
    """The Ready condition in the policy's status, as last written."""
    status = body.get("status")
    conditions = status.get("conditions") if isinstance(status, Mapping) else None
    for cond in conditions if isinstance(conditions, list) else ():
        if isinstance(cond, Mapping) and cond.get("type") == "Ready":
            return (
                str(cond.get("status")),
                str(cond.get("reason")),
                str(cond.get("message")),
                _int(cond.get("observedGeneration")),
                str(cond.get("lastTransitionTime") or ""),
            )
    return None


def _parse_policy(body: Mapping[str, Any]) -> Policy:
    meta = body.get("metadata", {})
    spec = body.get("spec") or {}
    cluster = body.get("kind") == "ClusterAccessPolicy"
    try:
        max_ttl = parse_duration(spec.get("maxTTL") or DEFAULT_MAX_TTL)
    except DurationError as exc:
        raise SpecError(f"spec.maxTTL: {exc}") from None
    rules = parse_rules(spec.get("rules"))
    recheck = _recheck_rules(spec.get("rules"), rules)
    idle_timeout = None
    if spec.get("idleTimeout") is not None:
        try:
            idle_timeout = parse_duration(spec["idleTimeout"])
        except DurationError as exc:
            raise SpecError(f"spec.idleTimeout: {exc}") from None
    presets = _presets(spec.get("presets"))
    max_active = spec.get("maxActiveTasks")
    if max_active is not None and (
        not isinstance(max_active, int) or isinstance(max_active, bool) or max_active < 1
    ):
        raise SpecError("spec.maxActiveTasks must be a whole number >= 1")
    intent = spec.get("intent") or {}
    if not isinstance(intent, Mapping):
        raise SpecError("spec.intent must be an object")
    pattern = intent.get("pattern")
    if pattern is not None and not isinstance(pattern, str):
        raise SpecError("spec.intent.pattern must be a string")
    problem = None
    why = pattern_problem(pattern) if pattern else None
    if why:
        problem = ("InvalidIntentPattern", f"spec.intent.pattern: {why}")
    try:
        conditions = compile_conditions(spec.get("conditions"))
    except ConditionError as exc:
        conditions, problem = (), ("InvalidCondition", str(exc))
    return Policy(
        name=meta.get("name", ""),
        namespace=None if cluster else meta.get("namespace"),
        subjects=frozenset(
            (s.get("namespace", ""), s.get("serviceAccount", ""))
            for s in spec.get("subjects") or ()
        ),
        rules=rules,
        max_ttl=max_ttl,
        require_pod=bool(spec.get("requirePod")),
        namespace_selector=spec.get("namespaceSelector") if cluster else None,
        resource_version=str(meta.get("resourceVersion", "")),
        requesters=frozenset(
            (str(r["kind"]), str(r.get("namespace") or ""), str(r["name"]))
            for r in spec.get("requesters") or ()
        ),
        allowed_audiences=frozenset(_strings(spec.get("allowedAudiences"), "allowedAudiences")),
        approval=_approval(spec.get("approval")),
        presets=presets,
        intent_pattern=pattern or None,
        max_active=max_active,
        conditions=conditions,
        recheck_rules=recheck,
        idle_timeout=idle_timeout,
        problem=problem,
        generation=_int(meta.get("generation")),
        uid=str(meta.get("uid") or ""),
        shown=shown_ready(body),
    )


def _recheck_rules(raw: Any, rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
    """The parsed rules whose source carries `recheck: true` (anything else: not)."""
    if not isinstance(raw, list | tuple):
        return ()
    marked = []
    for source, rule in zip(raw, rules, strict=False):
        flag = source.get("recheck") if isinstance(source, Mapping) else None
        if flag is not None and not isinstance(flag, bool):
            raise SpecError("spec.rules[].recheck must be true or false")
        if flag:
            marked.append(rule)
    return tuple(marked)


def _presets(raw: Any) -> dict[str, tuple[Rule, ...]]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise SpecError("spec.presets must map names to rule lists")
    out = {}
    for name, rules in raw.items():
        parsed = parse_rules(rules)
        if not isinstance(name, str) or not parsed:
            raise SpecError(f"spec.presets.{name}: needs at least one rule")
        out[sys.intern(name)] = parsed
    return out


def _approval(raw: Any) -> ApprovalRule | None:
    """`spec.approval`; None when it requires nothing (absent, or required 0)."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise SpecError("spec.approval must be an object")
    required = raw.get("required") or 0
    if not isinstance(required, int) or isinstance(required, bool) or required < 0:
        raise SpecError("spec.approval.required must be a whole number >= 0")
    if required == 0:
        return None
    try:
        timeout = parse_duration(raw.get("timeout") or DEFAULT_APPROVAL_TIMEOUT)
    except DurationError as exc:
        raise SpecError(f"spec.approval.timeout: {exc}") from None
    approvers = frozenset(
        (str(a["kind"]), str(a.get("namespace") or ""), str(a["name"]))
        for a in raw.get("approvers") or ()
    )
    return ApprovalRule(required=required, approvers=approvers, timeout=timeout)


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


@dataclass(frozen=True, slots=True)
class PodFacts:
    name: str
    uid: str
    service_account: str
    phase: str
    deleting: bool
    labels: tuple[tuple[str, str], ...] = ()

    def as_object(self, namespace: str) -> dict[str, Any]:
        """The pod as conditions see it."""
        return {
            "metadata": {
                "name": self.name,
                "namespace": namespace,
                "uid": self.uid,
                "labels": dict(self.labels),
            },
            "spec": {"serviceAccountName": self.service_account},
            "status": {"phase": self.phase},
        }


@dataclass(frozen=True, slots=True)
class World:
    """What the cluster looks like, gathered by the caller before deciding."""

    policies: Sequence[Policy] = ()
    #: Existing namespaces and their labels.
    namespaces: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    agent_exists: bool = True
    #: The pod named by spec.podName, or None when it does not exist.
    pod: PodFacts | None = None
    #: Why the agent is suspended (its ServiceAccount or its namespace), or None.
    suspended: str | None = None
    #: The agent's ServiceAccount and the pod, as conditions see them (conditions.py).
    agent_object: Mapping[str, Any] | None = None
    pod_object: Mapping[str, Any] | None = None


# ---------------------------------------------------------------------------
# Outputs


@dataclass(frozen=True, slots=True)
class Granted:
    grants: tuple[AccessEntry, ...]
    policies: tuple[Policy, ...]
    ttl: timedelta
    granted_at: datetime
    expires_at: datetime
    #: the request as granted: presets replaced by their rules
    spec: TaskSpec | None = None

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


@dataclass(frozen=True, slots=True)
class Denied:
    """A refusal. `message` is for the requester and reveals nothing they may not read
    (other namespaces' existence, policy names); `detail` goes only to the audit line."""

    reason: Reason
    message: str
    detail: str = ""
    #: The policy that came closest and what it lacks ("covers 3 of 5 ..."): added to
    #: the message only for a requester who may read that policy (explain.py).
    closest: Policy | None = None
    closest_note: str = ""


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


def check_size(spec: TaskSpec) -> Denied | None:
    """Bound the cost of a decision: coverage is checked atom by atom."""
    atoms = spec.atom_count
    if atoms > MAX_REQUEST_ATOMS:
        return Denied(
            Reason.INVALID_SPEC,
            f"the request expands to {atoms} (apiGroup, resource, verb, name) combinations; "
            f"the limit is {MAX_REQUEST_ATOMS}: split it into smaller tasks",
        )
    return None


def check_protected(spec: TaskSpec, namespaces: Mapping[str, Mapping[str, str]]) -> Denied | None:
    """Nothing is granted into a namespace labelled agentaccess.io/protected=true. The
    answer reads like one for a namespace no policy governs (no oracle)."""
    who = f"{spec.namespace}/{spec.agent}"
    for entry in spec.access:
        if (namespaces.get(entry.namespace) or {}).get(LABEL_PROTECTED) == "true":
            return Denied(
                Reason.NO_MATCHING_POLICY,
                f"namespace {entry.namespace}: no AccessPolicy or ClusterAccessPolicy lets "
                f"{who} request [{entry.rules[0].describe()}]",
                detail=f"the namespace is labelled {LABEL_PROTECTED}=true",
            )
    return None


def _atom_text(atom: tuple[str, str, str, str | None]) -> str:
    group, resource, verb, name = atom
    target = f"{group}/{resource}" if group else resource
    return f"{verb} {target}" + (f" {name}" if name else "")


def _requester_may_act(spec: TaskSpec, policy: Policy) -> bool:
    """A policy's `requesters`, and the rule that an agent asks only for itself: a
    ServiceAccount of the task's namespace may ask for another agent only when the
    policy lists it in `requesters`."""
    requester = spec.requester
    if not policy.allows_requester(requester):
        return False
    sa = requester.service_account() if requester else None
    if sa and sa[0] == spec.namespace and sa[1] != spec.agent:
        # only an explicit ServiceAccount entry, not a group all agents are in
        return ("ServiceAccount", sa[0], sa[1]) in policy.requesters
    return True


def _asks_for_another(spec: TaskSpec) -> bool:
    sa = spec.requester.service_account() if spec.requester else None
    return bool(sa and sa[0] == spec.namespace and sa[1] != spec.agent)


def check_coverage(
    spec: TaskSpec,
    policies: Sequence[Policy],
    namespaces: Mapping[str, Mapping[str, str]],
    context: Mapping[str, Any] | None = None,
) -> tuple[tuple[Policy, ...], Denied | None]:
    """Is every requested rule covered by the policies that apply to its namespace?

    Returns the policies that contributed (each covers at least one requested
    atom), and a denial naming the namespace and the first uncovered rule. A target
    namespace that does not exist is refused exactly like one no policy governs, so
    the answer reveals nothing about namespaces the requester cannot see.

    A policy applies only while its conditions hold, evaluated with `context` (the
    CEL variables but the namespace, see conditions.py) and the target namespace;
    without a context, a policy with conditions does not apply (fail closed). When
    only policies whose conditions fail would have covered a rule: ConditionFailed.
    """
    subject = (spec.namespace, spec.agent)
    used: dict[str, Policy] = {}
    who = f"{spec.namespace}/{spec.agent}"
    for entry in spec.access:
        labels = namespaces.get(entry.namespace)
        exists = labels is not None
        naming = [
            p
            for p in policies
            if exists
            and p.problem is None
            and subject in p.subjects
            and p.governs(entry.namespace, labels or {})
        ]
        with_pod = [p for p in naming if spec.pod_name or not p.require_pod]
        candidates = [p for p in with_pod if _requester_may_act(spec, p)]
        failing = _failing_conditions(candidates, entry.namespace, labels, context)
        applicable = [p for p in candidates if p.key not in failing]
        checks = sum(r.atom_count for r in entry.rules) * sum(len(p.ceiling) for p in candidates)
        if checks > MAX_COVERAGE_CHECKS:
            return (), Denied(
                Reason.INVALID_SPEC,
                f"namespace {entry.namespace}: the request is too large to evaluate against "
                "the policies that apply: split it into smaller tasks",
                detail=f"{checks} rule comparisons, limit {MAX_COVERAGE_CHECKS}",
            )
        if not applicable:
            first = entry.rules[0].describe()
            if candidates:  # they would apply, but their conditions do not hold
                key = sorted(failing)[0]
                return (), Denied(
                    Reason.CONDITION_FAILED,
                    f"namespace {entry.namespace}: {failing[key].message}",
                    detail=f"policy {key}: {failing[key].detail}",
                )
            if with_pod or _asks_for_another(spec):
                requester = spec.requester.username if spec.requester else "unknown"
                return (), Denied(
                    Reason.REQUESTER_NOT_ALLOWED,
                    f"namespace {entry.namespace}: {requester} may not request access for "
                    f"agent {who}: a ServiceAccount asks only for itself, unless a policy "
                    "lists it in requesters",
                    detail=f"policies naming the agent: {', '.join(p.key for p in with_pod)}",
                )
            why = "the namespace does not exist" if not exists else "no policy names the agent"
            closest, note = None, ""
            if naming:
                why = f"{', '.join(p.key for p in naming)} require spec.podName"
                closest, note = naming[0], "requires spec.podName"
            elif exists:
                governing = sorted(
                    (
                        p
                        for p in policies
                        if p.problem is None and p.governs(entry.namespace, labels or {})
                    ),
                    key=lambda p: p.key,
                )
                if governing:
                    closest, note = governing[0], f"does not name {who} in its subjects"
            hint = "" if spec.pod_name else " (some policies require spec.podName)"
            return (), Denied(
                Reason.NO_MATCHING_POLICY,
                f"namespace {entry.namespace}: no AccessPolicy or ClusterAccessPolicy lets "
                f"{who} request [{first}]{hint}",
                detail=why,
                closest=closest,
                closest_note=note,
            )
        for rule in entry.rules:
            missing = []
            for atom in rule.atoms():
                covering = [p for p in applicable if any(rule_covers(c, atom) for c in p.ceiling)]
                if not covering:
                    missing.append(atom)
                for p in covering:
                    used.setdefault(p.key, p)
            rescuers = [
                p
                for p in candidates
                if p.key in failing and any(rule_covers(c, a) for a in missing for c in p.ceiling)
            ]
            if rescuers:  # a policy would cover it, were its conditions to hold
                failure = failing[rescuers[0].key]
                return (), Denied(
                    Reason.CONDITION_FAILED,
                    f"namespace {entry.namespace}: {failure.message}",
                    detail=f"policy {rescuers[0].key}: {failure.detail}",
                )
            if missing:
                shown = "; ".join(_atom_text(a) for a in missing[:5])
                more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
                closest, covered, total = _closest(entry, applicable)
                return (), Denied(
                    Reason.RULE_NOT_ALLOWED,
                    f"namespace {entry.namespace}: rule [{rule.describe()}] is not covered by "
                    f"the policies that apply: missing {shown}{more}",
                    detail=f"applicable policies: {', '.join(p.key for p in applicable)}",
                    closest=closest,
                    closest_note=f"covers {covered} of the {total} permissions requested in "
                    f"{entry.namespace}",
                )
    return tuple(sorted(used.values(), key=lambda p: p.key)), None


def resolve_presets(
    spec: TaskSpec, policies: Sequence[Policy], namespaces: Mapping[str, Mapping[str, str]]
) -> TaskSpec | Denied:
    """Replace each `preset` entry by the rules of the preset, as defined by a policy that
    applies to the entry (several define it: the first by name). Coverage is then
    checked as for any rules (a policy's presets are part of what it may grant)."""
    if not any(e.preset for e in spec.access):
        return spec
    who = f"{spec.namespace}/{spec.agent}"
    subject = (spec.namespace, spec.agent)
    entries = []
    for entry in spec.access:
        if not entry.preset:
            entries.append(entry)
            continue
        labels = namespaces.get(entry.namespace)
        defining = sorted(
            (
                p
                for p in policies
                if labels is not None
                and p.problem is None
                and entry.preset in p.presets
                and subject in p.subjects
                and p.governs(entry.namespace, labels)
                and (spec.pod_name or not p.require_pod)
                and _requester_may_act(spec, p)
            ),
            key=lambda p: p.key,
        )
        if not defining:
            return Denied(
                Reason.NO_MATCHING_POLICY,
                f"namespace {entry.namespace}: no AccessPolicy or ClusterAccessPolicy lets "
                f"{who} use the preset {entry.preset!r}",
            )
        entries.append(replace(entry, rules=defining[0].presets[entry.preset]))
    return replace(spec, access=tuple(entries))


def check_intent(spec: TaskSpec, used: Sequence[Policy]) -> Denied | None:
    """Every covering policy's intent pattern (RE2, unanchored unless the pattern says)."""
    for p in used:
        if p.intent_pattern is not None and not intent_matches(p.intent_pattern, spec.intent):
            return Denied(
                Reason.INTENT_REJECTED,
                "the intent does not match the pattern a policy covering this request requires",
                detail=f"policy {p.key}",
                closest=p,
                closest_note=f"requires an intent matching {p.intent_pattern}",
            )
    return None


def check_limits(
    spec: TaskSpec, used: Sequence[Policy], active: Mapping[str, int]
) -> Denied | None:
    """maxActiveTasks: `active` counts the agent's live tasks (and those being issued)
    per policy key."""
    for p in used:
        if p.max_active is not None and active.get(p.key, 0) >= p.max_active:
            return Denied(
                Reason.LIMIT_EXCEEDED,
                f"agent {spec.namespace}/{spec.agent} already has {active.get(p.key, 0)} live "
                f"task(s) under a policy that allows {p.max_active} at once: wait until one "
                "ends, or cancel one",
                detail=f"policy {p.key} maxActiveTasks {p.max_active}",
            )
    return None


def _failing_conditions(
    policies: Sequence[Policy],
    namespace: str,
    labels: Mapping[str, str] | None,
    context: Mapping[str, Any] | None,
) -> dict[str, Failure]:
    """{policy key: why} for the policies whose conditions do not hold here."""
    failing: dict[str, Failure] = {}
    with_conditions = [p for p in policies if p.conditions]
    if not with_conditions:
        return failing
    if context is None:
        blind = Failure(NOT_HOLDING, "its conditions cannot be evaluated here")
        return {p.key: blind for p in with_conditions}
    variables = for_namespace(context, namespace_object(namespace, labels))
    for p in with_conditions:
        why = holds(p.conditions, variables)
        if why:
            failing[p.key] = why
    return failing


def _closest(entry: AccessEntry, applicable: Sequence[Policy]) -> tuple[Policy, int, int]:
    """The applicable policy covering most of the entry's permissions (ties: the first
    by name), how many it covers and of how many. Bounded like the coverage check."""
    atoms = [a for r in entry.rules for a in r.atoms()]
    counted = [
        (sum(1 for a in atoms if any(rule_covers(c, a) for c in p.ceiling)), p)
        for p in sorted(applicable, key=lambda p: p.key)
    ]
    covered, best = max(counted, key=lambda c: c[0])  # the first of the best
    return best, covered, len(atoms)


def check_audiences(spec: TaskSpec, used: Sequence[Policy]) -> Denied | None:
    """Audiences beyond the API server's own need every covering policy's consent."""
    for audience in spec.audiences:
        refusing = [p.key for p in used if audience not in p.allowed_audiences]
        if refusing:
            return Denied(
                Reason.AUDIENCE_NOT_ALLOWED,
                f"token audience {audience!r} is not allowed by every policy covering this "
                "request (allowedAudiences)",
                detail=f"not allowed by: {', '.join(refusing)}",
            )
    return None


def floor_seconds(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(microsecond=0)


def evaluate(
    spec: TaskSpec,
    world: World,
    now: datetime,
    guardrails: Guardrails = DEFAULT_GUARDRAILS,
) -> Decision:
    """Decide a request. Presets resolved, guardrails, then facts, then policy coverage,
    intent, audiences and TTL. (Limits need the live count: the caller checks them.)"""
    resolved = resolve_presets(spec, world.policies, world.namespaces)
    if isinstance(resolved, Denied):
        return resolved
    spec = resolved
    denied = check_guardrails(spec, guardrails) or check_size(spec)
    if denied:
        return denied
    if not world.agent_exists:
        return Denied(
            Reason.AGENT_NOT_FOUND,
            f"ServiceAccount {spec.agent!r} does not exist in namespace {spec.namespace}",
        )
    if world.suspended:
        return Denied(Reason.AGENT_SUSPENDED, world.suspended)
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
    denied = check_protected(spec, world.namespaces)
    if denied:
        return denied
    context = condition_context(spec, world.policies, world.agent_object, world.pod_object, now)
    used, denied = check_coverage(spec, world.policies, world.namespaces, context)
    denied = denied or check_intent(spec, used) or check_audiences(spec, used)
    if denied:
        return denied
    ttl = min([spec.ttl, *(p.max_ttl for p in used)])
    ttl = timedelta(seconds=max(1, int(ttl.total_seconds())))
    granted_at = floor_seconds(now)
    return Granted(
        spec=spec,
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


def condition_context(
    spec: TaskSpec,
    policies: Sequence[Policy],
    agent: Mapping[str, Any] | None,
    pod: Mapping[str, Any] | None,
    now: datetime,
) -> dict[str, Any] | None:
    """The CEL variables but the target namespace; None when no policy has conditions
    (nothing is built for the common case)."""
    if not any(p.conditions for p in policies):
        return None
    requester = spec.requester.to_dict() if spec.requester else None
    return activation(task_object(spec), agent, pod, requester, now)


def reassess(
    spec: TaskSpec,
    policies: Sequence[Policy],
    namespaces: Mapping[str, Mapping[str, str]],
    previous_policies: Sequence[str],
    context: Mapping[str, Any] | None = None,
) -> Denied | timedelta:
    """After an outside change: the longest grant the policies allow now, or why the
    grant must end (PolicyDeleted when a policy it relied on is gone, else
    PolicyChanged). One coverage pass serves both."""
    protected = check_protected(spec, namespaces)
    if protected:
        return Denied(
            Reason.POLICY_CHANGED,
            f"namespace labelled {LABEL_PROTECTED}=true: nothing is granted there",
            protected.detail,
        )
    unknown = [e.namespace for e in spec.access if e.preset and not e.rules]
    if unknown:  # fail closed: what a preset granted must be known to be re-checked
        return Denied(
            Reason.POLICY_CHANGED,
            f"the rules granted by preset in {', '.join(unknown)} are not known any more",
        )
    used, denied = check_coverage(spec, policies, namespaces, context)
    denied = denied or check_intent(spec, used) or check_audiences(spec, used)
    if denied is not None and denied.reason == Reason.CONDITION_FAILED:
        return denied  # Revoked / ConditionFailed
    if denied is None:
        ttl = min([spec.ttl, *(p.max_ttl for p in used)])
        return timedelta(seconds=max(1, int(ttl.total_seconds())))
    existing = {p.key for p in policies}
    gone = [k for k in previous_policies if k not in existing]
    reason = Reason.POLICY_DELETED if gone else Reason.POLICY_CHANGED
    prefix = f"policy {', '.join(gone)} deleted; " if gone else "policies changed; "
    return Denied(reason, prefix + denied.message, denied.detail)
