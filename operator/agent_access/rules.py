"""RBAC PolicyRules: parsing, rendering, coverage and guardrails.

Purely computational, no side effects.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .model import OWN_RESOURCES, WRITE_VERBS

WILDCARD = "*"


def _string_list(raw: Any) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list | tuple) or not all(isinstance(v, str) for v in raw):
        raise ValueError("rule fields must be lists of strings")
    return tuple(sys.intern(v) for v in raw)  # "pods", "get": one copy for all grants


@dataclass(frozen=True, slots=True)
class Rule:
    """One RBAC PolicyRule restricted to what a Role may hold (no nonResourceURLs)."""

    api_groups: tuple[str, ...]
    resources: tuple[str, ...]
    verbs: tuple[str, ...]
    resource_names: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Rule:
        """Raise ValueError for anything but lists of strings."""
        if not isinstance(raw, Mapping):
            raise ValueError("a rule must be an object")
        return cls(
            api_groups=_string_list(raw.get("apiGroups")),
            resources=_string_list(raw.get("resources")),
            verbs=_string_list(raw.get("verbs")),
            resource_names=_string_list(raw.get("resourceNames")),
        )

    @property
    def atom_count(self) -> int:
        return (
            len(self.api_groups)
            * len(self.resources)
            * len(self.verbs)
            * max(1, len(self.resource_names))
        )

    def to_dict(self) -> dict[str, list[str]]:
        out = {
            "apiGroups": list(self.api_groups),
            "resources": list(self.resources),
            "verbs": list(self.verbs),
        }
        if self.resource_names:
            out["resourceNames"] = list(self.resource_names)
        return out

    def describe(self) -> str:
        """A short human form used in messages: verbs on group/resources [names]."""
        groups = ",".join(g or '""' for g in self.api_groups)
        text = f"{','.join(self.verbs)} on {','.join(self.resources)} (apiGroups {groups})"
        if self.resource_names:
            text += f" named {','.join(self.resource_names)}"
        return text

    def atoms(self) -> Iterator[tuple[str, str, str, str | None]]:
        """Every (apiGroup, resource, verb, resourceName-or-None) the rule grants."""
        names: tuple[str | None, ...] = self.resource_names or (None,)
        for group in self.api_groups:
            for resource in self.resources:
                for verb in self.verbs:
                    for name in names:
                        yield group, resource, verb, name


def _matches(allowed: tuple[str, ...], value: str) -> bool:
    return WILDCARD in allowed or value in allowed


def rule_covers(ceiling: Rule, atom: tuple[str, str, str, str | None]) -> bool:
    """True when a policy rule allows one atom of a request.

    A policy naming resourceNames only covers requests narrowed to those names.
    """
    group, resource, verb, name = atom
    if not (
        _matches(ceiling.api_groups, group)
        and _matches(ceiling.resources, resource)
        and _matches(ceiling.verbs, verb)
    ):
        return False
    if not ceiling.resource_names:
        return True
    return name is not None and _matches(ceiling.resource_names, name)


def uncovered_atoms(
    request: Rule, ceilings: Iterable[Rule]
) -> list[tuple[str, str, str, str | None]]:
    ceilings = list(ceilings)
    return [a for a in request.atoms() if not any(rule_covers(c, a) for c in ceilings)]


@dataclass(frozen=True, slots=True)
class Guardrails:
    """What no request may hold, whatever a policy says."""

    forbidden_verbs: frozenset[str] = frozenset({"escalate", "bind", "impersonate"})
    #: Any verb starting with one of these (constrained impersonation: impersonate:*,
    #: impersonate-on:*; and any future verb of the family).
    forbidden_verb_prefixes: tuple[str, ...] = ("impersonate",)
    forbidden_resources: frozenset[str] = frozenset(
        {"serviceaccounts/token", "certificatesigningrequests", "pods/ephemeralcontainers"}
    )
    write_protected_resources: frozenset[str] = frozenset(
        {
            "roles",
            "rolebindings",
            "clusterroles",
            "clusterrolebindings",
            "serviceaccounts",
            "mutatingwebhookconfigurations",
            "validatingwebhookconfigurations",
            "customresourcedefinitions",
            "namespaces",
            *OWN_RESOURCES,
        }
    )
    write_verbs: frozenset[str] = field(default=WRITE_VERBS)
    #: When set, the only namespaces the install lets the operator grant into.
    target_namespaces: frozenset[str] | None = None
    #: Namespaces nothing is ever granted in (the operator's own).
    protected_namespaces: frozenset[str] = frozenset()

    def extended(
        self,
        verbs: Iterable[str] = (),
        resources: Iterable[str] = (),
        write_protected: Iterable[str] = (),
        target_namespaces: Iterable[str] | None = None,
        protected_namespaces: Iterable[str] = (),
    ) -> Guardrails:
        """The defaults plus what an install adds (they can only grow)."""
        targets = self.target_namespaces
        if target_namespaces is not None:
            wanted = frozenset(target_namespaces)
            targets = wanted if targets is None else targets & wanted
        return Guardrails(
            forbidden_verbs=self.forbidden_verbs | frozenset(verbs),
            forbidden_verb_prefixes=self.forbidden_verb_prefixes,
            forbidden_resources=self.forbidden_resources | frozenset(resources),
            write_protected_resources=self.write_protected_resources | frozenset(write_protected),
            write_verbs=self.write_verbs,
            target_namespaces=targets,
            protected_namespaces=self.protected_namespaces | frozenset(protected_namespaces),
        )

    def namespace_violation(self, namespace: str) -> str | None:
        if namespace in self.protected_namespaces:
            return "this installation does not grant into this namespace"
        if self.target_namespaces is not None and namespace not in self.target_namespaces:
            return "this installation does not grant into this namespace"
        return None

    def _resource_forbidden(self, resource: str) -> bool:
        # "certificatesigningrequests" also forbids its subresources (approval, status).
        return any(resource == f or resource.startswith(f + "/") for f in self.forbidden_resources)

    def violation(self, rule: Rule) -> str | None:
        """Why this requested rule is forbidden, or None when it is not."""
        for name, values in (
            ("apiGroups", rule.api_groups),
            ("resources", rule.resources),
            ("verbs", rule.verbs),
            ("resourceNames", rule.resource_names),
        ):
            if any(WILDCARD in v for v in values):
                return f"wildcard '*' in {name} is never granted"
        for verb in rule.verbs:
            if verb in self.forbidden_verbs or verb.startswith(self.forbidden_verb_prefixes):
                return f"verb {verb!r} lets access grow beyond the grant"
        for resource in rule.resources:
            if self._resource_forbidden(resource):
                return f"resource {resource!r} lets access outlive the grant"
            base = resource.split("/", 1)[0]
            if base in self.write_protected_resources:
                writes = sorted(set(rule.verbs) & self.write_verbs)
                if writes:
                    return f"write verbs {writes} on {resource!r} let access grow beyond the grant"
        return None


DEFAULT_GUARDRAILS = Guardrails()


def parse_rules(raw: Iterable[Mapping[str, Any]] | None) -> tuple[Rule, ...]:
    if raw is not None and not isinstance(raw, list | tuple):
        raise ValueError("rules must be a list")
    return tuple(Rule.from_dict(r) for r in (raw or ()))
