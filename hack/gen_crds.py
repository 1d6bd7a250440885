#!/usr/bin/env python3
"""Generate crds/*.yaml (run `make crds`; a unit test checks they are current)."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "operator"))
sys.path.insert(0, str(ROOT / "hack"))

import admission  # noqa: E402  (hack/admission.py)

from agent_access.durations import PATTERN as DURATION  # noqa: E402
from agent_access.model import GROUP, VERSION  # noqa: E402

ADMISSION_NOTE = f"""# Admission policies that keep anyone but the operator from steering it,
# and keep the operator to its own objects (docs/security.md). The operator
# identity below is the default install's:
#   {admission.DEFAULT_OPERATOR}
# Members of system:masters are always trusted. Running the operator under another
# identity? Install with the chart, which renders these with its own.
"""
NAME = {"type": "string", "maxLength": 253, "minLength": 1}
DNS_LABEL = {
    "type": "string",
    "maxLength": 63,
    "minLength": 1,
    "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
}
#: Durations beyond a year are refused at apply time (the engine refuses them too).
BOUNDED_DURATION = {
    "rule": "duration(self) <= duration('8784h')",
    "message": "must be at most 8784h (366 days)",
}
#: Who did something, as the API server recorded it (requester, approver).
IDENTITY = {
    "type": "object",
    "properties": {
        "username": {"type": "string", "maxLength": 1024, "description": "The user name."},
        "uid": {"type": "string", "maxLength": 1024, "description": "The UID, if any."},
        "groups": {
            "type": "array",
            "maxItems": 1024,
            "items": {"type": "string", "maxLength": 1024},
            "x-kubernetes-list-type": "atomic",
            "description": "The groups.",
        },
    },
}
#: A JSON-schema pattern, not CEL: CEL on items of nested lists exceeds the cost budget.
NO_WILDCARD = r"^[^*]*$"


def strings(
    desc: str,
    *,
    min_items: int = 0,
    max_items: int = 64,
    wildcard: bool = True,
    empty_ok: bool = False,
) -> dict:
    item: dict = {"type": "string", "maxLength": 253}
    if not empty_ok:
        item["minLength"] = 1
    if not wildcard:
        item["pattern"] = NO_WILDCARD
        desc += " '*' is refused at apply time: list exactly what the agent needs."
    out = {"type": "array", "description": desc, "items": item, "maxItems": max_items}
    if min_items:
        out["minItems"] = min_items
    return out


def with_recheck(schema: dict) -> dict:
    """A policy's own rules may ask for a live re-check of every call that needs them."""
    props = dict(schema["properties"])
    props["recheck"] = {
        "type": "boolean",
        "description": "With the operator as the API server's authorization webhook: every "
        "call that needs a permission of this rule is re-evaluated when it is made (task "
        "Active, this policy still covers the task, conditions hold, pod running) and "
        "refused, and the grant revoked, if not.",
    }
    return {**schema, "properties": props}


def rule_schema(request: bool) -> dict:
    who = "requested" if request else "that may be granted"
    return {
        "type": "object",
        "description": (
            f"An RBAC PolicyRule {who}: verbs on resources in API groups, optionally narrowed "
            "to resourceNames."
            + (
                " No '*' anywhere: list exactly what is needed."
                if request
                else " '*' is allowed here as a ceiling; guardrails still apply."
            )
        ),
        "required": ["apiGroups", "resources", "verbs"],
        "properties": {
            "apiGroups": strings(
                'API groups, "" for the core group (pods, secrets, ...).',
                min_items=1,
                max_items=16,
                wildcard=not request,
                empty_ok=True,
            ),
            "resources": strings(
                "Resources, e.g. pods or pods/log (a subresource is named explicitly).",
                min_items=1,
                max_items=32,
                wildcard=not request,
            ),
            "verbs": strings(
                "Verbs, e.g. get, list, watch, create, patch, delete.",
                min_items=1,
                max_items=16,
                wildcard=not request,
            ),
            "resourceNames": strings(
                "Optional narrowing to named objects."
                + (
                    ""
                    if request
                    else " When a policy names any, it only covers requests "
                    "narrowed to those names."
                ),
                max_items=64,
                wildcard=not request,
            ),
        },
    }


def crd(
    kind: str,
    plural: str,
    short: str,
    scope: str,
    spec: dict,
    status: dict | None,
    columns: list[dict],
    desc: str,
    validations: list[dict] | None = None,
) -> dict:
    schema: dict = {
        "type": "object",
        "description": desc,
        "properties": {
            "apiVersion": {
                "type": "string",
                "description": "Versioned schema of this object: agentaccess.io/v1alpha1.",
            },
            "kind": {"type": "string", "description": f"The kind of this object: {kind}."},
            # The API server describes metadata itself (ObjectMeta) and refuses more here.
            "metadata": {"type": "object"},
            "spec": spec,
        },
        "required": ["spec"],
    }
    if status:
        schema["properties"]["status"] = status
    if validations:
        schema["x-kubernetes-validations"] = validations
    version = {
        "name": VERSION,
        "served": True,
        "storage": True,
        "schema": {"openAPIV3Schema": schema},
        "additionalPrinterColumns": columns,
    }
    if status:
        version["subresources"] = {"status": {}}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "agent-access-operator"},
        },
        "spec": {
            "group": GROUP,
            "scope": scope,
            "names": {
                "kind": kind,
                "plural": plural,
                "singular": kind.lower(),
                "listKind": f"{kind}List",
                "shortNames": [short],
                "categories": ["agentaccess"],
            },
            "versions": [version],
        },
    }


AGE = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}

TASK_SPEC = {
    "type": "object",
    "description": "What the agent asks for: who, why, what, for how long.",
    "required": ["agent", "intent"],
    "properties": {
        "agent": {
            **NAME,
            "description": "The ServiceAccount (in this namespace) the agent runs "
            "as. Its base identity; it holds no standing grants.",
        },
        "intent": {
            "type": "string",
            "minLength": 1,
            "maxLength": 65536,
            "pattern": r"\S",
            "description": "Why access is needed; recorded in every audit line.",
        },
        "ttl": {
            "type": "string",
            "default": "15m",
            "pattern": DURATION,
            "maxLength": 32,
            "x-kubernetes-validations": [BOUNDED_DURATION],
            "description": "Requested lifetime in Go duration syntax (e.g. 10m, 1h30m); "
            "clamped to the smallest maxTTL of the policies that allowed it. Default 15m.",
        },
        "podName": {
            **NAME,
            "description": "Optional: the pod doing the task (same namespace, "
            "running as the agent). When it succeeds, fails or is deleted, the grant "
            "ends at once.",
        },
        "cancel": {
            "type": "boolean",
            "default": False,
            "description": "Set true to end the grant now; the record is kept for audit. "
            "Cannot be set back to false.",
        },
        "dryRun": {
            "type": "boolean",
            "default": False,
            "description": "Decide the task exactly as a real one but issue nothing: it ends "
            "Completed/DryRun with status.grants, expiresAt and policies showing what "
            "would have been granted, or Denied with the real reason.",
        },
        "audiences": strings("Token audiences (default: the API server's own).", max_items=8),
        "access": {
            "type": "array",
            "minItems": 1,
            "maxItems": 32,
            "description": "What is requested, one entry per target namespace. All or "
            "nothing: if any rule is not allowed, nothing is granted.",
            "items": {
                "type": "object",
                "properties": {
                    "namespace": {
                        **DNS_LABEL,
                        "description": "Target namespace (default: the AgentTask's namespace).",
                    },
                    "rules": {
                        "type": "array",
                        "minItems": 1,
                        "maxItems": 1024,
                        "description": "RBAC rules requested in this namespace.",
                        "items": rule_schema(request=True),
                    },
                    "preset": {
                        **NAME,
                        "description": "Instead of rules: the name of a preset (a named rule "
                        "set) defined by a policy that applies here.",
                    },
                },
                "x-kubernetes-validations": [
                    {
                        "rule": "has(self.rules) != has(self.preset)",
                        "message": "give rules or a preset (exactly one)",
                    }
                ],
            },
        },
    },
    "x-kubernetes-validations": [
        {
            "rule": "has(self.access) != has(self.stages)",
            "message": "give spec.access, or spec.stages for a staged task (exactly one)",
        },
        {
            "rule": "!has(self.stage) || (has(self.stages) && "
            "self.stages.exists(s, s.name == self.stage))",
            "message": "spec.stage must name one of spec.stages",
        },
        {
            # the index of the new stage >= the old one's (two-variable comprehensions)
            "rule": "!has(self.stages) || !has(oldSelf.stage) || self.stages.exists(i, s, "
            "s.name == (has(self.stage) ? self.stage : self.stages[0].name) && "
            "self.stages.exists(j, t, t.name == oldSelf.stage && i >= j))",
            "message": "spec.stage may only move forward (to a later stage)",
        },
        {
            "rule": "has(self.stages) == has(oldSelf.stages) && (!has(self.stages) || "
            "self.stages.map(s, s.name) == oldSelf.stages.map(s, s.name))",
            "message": "spec.stages cannot be added, removed, renamed or reordered: create a "
            "new AgentTask",
        },
        {
            "rule": "!has(oldSelf.cancel) || !oldSelf.cancel || (has(self.cancel) && self.cancel)",
            "message": "spec.cancel cannot be set back to false: create a new AgentTask",
        },
        {
            "rule": "self.agent == oldSelf.agent && self.intent == oldSelf.intent"
            " && has(self.ttl) == has(oldSelf.ttl) && (!has(self.ttl) || self.ttl == oldSelf.ttl)"
            " && has(self.podName) == has(oldSelf.podName)"
            " && (!has(self.podName) || self.podName == oldSelf.podName)"
            " && has(self.audiences) == has(oldSelf.audiences)"
            " && has(self.dryRun) == has(oldSelf.dryRun)"
            " && (!has(self.dryRun) || self.dryRun == oldSelf.dryRun)",
            "message": "spec is immutable except cancel: create a new AgentTask to ask for "
            "different access",
        },
    ],
}
# access and audiences get their own transition rule (kept apart to bound CEL cost).
TASK_SPEC["properties"]["access"]["x-kubernetes-validations"] = [
    {"rule": "self == oldSelf", "message": "spec.access is immutable: create a new AgentTask"}
]
TASK_SPEC["properties"]["audiences"]["x-kubernetes-validations"] = [
    {"rule": "self == oldSelf", "message": "spec.audiences is immutable: create a new AgentTask"}
]

CONDITION = {
    "type": "object",
    "required": ["type", "status"],
    "properties": {
        "type": {"type": "string", "description": "Granted: True while access is live."},
        "status": {
            "type": "string",
            "enum": ["True", "False", "Unknown"],
            "description": "True, False or Unknown.",
        },
        "reason": {"type": "string", "description": "One CamelCase word."},
        "message": {"type": "string", "description": "Details for humans."},
        "lastTransitionTime": {
            "type": "string",
            "format": "date-time",
            "description": "When the condition last changed status (RFC 3339).",
        },
        "observedGeneration": {
            "type": "integer",
            "format": "int64",
            "description": "The task's metadata.generation the condition was set for.",
        },
    },
}

TASK_STATUS = {
    "type": "object",
    "description": "What the operator decided and granted.",
    "properties": {
        "phase": {
            "type": "string",
            "description": "Pending, Active, or a terminal phase: "
            "Denied, Expired, Completed, Cancelled, Revoked, Failed.",
            "enum": [
                "Pending",
                "Active",
                "Denied",
                "Expired",
                "Completed",
                "Cancelled",
                "Revoked",
                "Failed",
            ],
        },
        "reason": {
            "type": "string",
            "description": "Why, in one CamelCase word (e.g. "
            "PolicyAllowed, RuleNotAllowed, TTLExpired).",
        },
        "message": {"type": "string", "description": "Details for humans."},
        "observedGeneration": {
            "type": "integer",
            "format": "int64",
            "description": "The metadata.generation the operator last acted on.",
        },
        "serviceAccountName": {
            "type": "string",
            "description": "The ephemeral per-task identity the token belongs to.",
        },
        "tokenSecretName": {
            "type": "string",
            "description": "Secret in this namespace holding the token under the key `token`.",
        },
        "podUID": {"type": "string", "description": "UID of the pod the grant is bound to."},
        "requester": {
            **IDENTITY,
            "description": "Who created the task, as the API server recorded it at admission "
            "(stamped by a MutatingAdmissionPolicy; clients cannot set it).",
        },
        "stage": {"type": "string", "description": "Staged tasks: the current stage."},
        "credentialHash": {
            "type": "string",
            "description": "A hash of the token's credential id (its JTI): lets the "
            "authorization webhook tell the token's own calls from access reviews others "
            "make about the identity. Not the token, nor its id.",
        },
        "lastUsedAt": {
            "type": "string",
            "format": "date-time",
            "description": "Under a policy with idleTimeout: the last call of the per-task "
            "identity the operator recorded (at most every few seconds).",
        },
        "taskExpiresAt": {
            "type": "string",
            "format": "date-time",
            "description": "Staged tasks: when the whole task ends at the latest.",
        },
        "stages": {
            "type": "array",
            "description": "Staged tasks: each stage reached so far.",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "description": "The stage."},
                    "phase": {
                        "type": "string",
                        "description": "Pending, Active, Completed, Skipped, or the phase the "
                        "task ended in.",
                    },
                    "reason": {"type": "string", "description": "One CamelCase word."},
                    "startedAt": {
                        "type": "string",
                        "format": "date-time",
                        "description": "When the operator began deciding the stage.",
                    },
                    "grantedAt": {
                        "type": "string",
                        "format": "date-time",
                        "description": "When its access was granted.",
                    },
                    "expiresAt": {
                        "type": "string",
                        "format": "date-time",
                        "description": "When its access ends at the latest.",
                    },
                    "endedAt": {
                        "type": "string",
                        "format": "date-time",
                        "description": "When it ended.",
                    },
                    "grants": {
                        "type": "array",
                        "description": "What the stage granted, per namespace.",
                        "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                    },
                },
            },
        },
        "approvals": {
            "type": "array",
            "description": "Every AgentTaskApproval made for this task, in the order made, "
            "and whether it counted.",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "description": "The AgentTaskApproval."},
                    "approver": {**IDENTITY, "description": "Who decided (stamped at admission)."},
                    "decision": {"type": "string", "description": "Approve or Deny."},
                    "comment": {"type": "string", "description": "The approver's comment."},
                    "time": {
                        "type": "string",
                        "format": "date-time",
                        "description": "When the decision was made (its creationTimestamp).",
                    },
                    "counted": {
                        "type": "boolean",
                        "description": "Whether it counts toward the policies' approval.",
                    },
                    "reason": {
                        "type": "string",
                        "description": "Why it does not count (counted false).",
                    },
                },
            },
        },
        "grantedAt": {
            "type": "string",
            "format": "date-time",
            "description": "When access was granted (RFC 3339).",
        },
        "expiresAt": {
            "type": "string",
            "format": "date-time",
            "description": "When access ends at the latest (RFC 3339): the token is refused "
            "from then on. A lowered policy maxTTL can move it earlier, never later.",
        },
        "endedAt": {
            "type": "string",
            "format": "date-time",
            "description": "When the grant ended (any terminal phase).",
        },
        "policies": {
            "type": "array",
            "items": {"type": "string"},
            "description": "Policies that allowed the grant (namespace/name, or name "
            "for a ClusterAccessPolicy).",
        },
        "grants": {
            "type": "array",
            "description": "What was actually granted, per namespace (after a dry run: what "
            "would have been, without Role names).",
            "items": {
                "type": "object",
                "properties": {
                    "namespace": {
                        "type": "string",
                        "description": "The namespace access was granted in.",
                    },
                    "roleName": {
                        "type": "string",
                        "description": "The Role holding the granted rules there.",
                    },
                    "roleBindingName": {
                        "type": "string",
                        "description": "The RoleBinding giving them to the per-task identity.",
                    },
                    "rules": {
                        "type": "array",
                        "description": "The RBAC rules granted there.",
                        "items": rule_schema(request=True)
                        | {
                            "properties": {
                                k: {
                                    "type": "array",
                                    "items": {"type": "string"},
                                    "description": f"RBAC {k} of this rule.",
                                }
                                for k in ("apiGroups", "resources", "verbs", "resourceNames")
                            }
                        },
                    },
                },
            },
        },
        "conditions": {
            "type": "array",
            "description": "Kubernetes conditions; type Granted is True while access is live.",
            "items": CONDITION,
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    },
}


def _stages_schema() -> dict:
    access = dict(TASK_SPEC["properties"]["access"])
    access = {**access, "maxItems": 8, "description": "What this stage requests, one entry "
              "per target namespace (as spec.access)."}  # fmt: skip
    return {
        "type": "array",
        "minItems": 1,
        "maxItems": 16,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["name"],
        "description": "A staged task: its stages, in order, instead of spec.access. Only the "
        "current stage's access is ever live; see docs/stages.md.",
        "items": {
            "type": "object",
            "required": ["name", "access"],
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.ttl) == has(oldSelf.ttl) && "
                    "(!has(self.ttl) || self.ttl == oldSelf.ttl)",
                    "message": "a stage's ttl is immutable: create a new AgentTask",
                }
            ],
            "properties": {
                "name": {**DNS_LABEL, "description": "The stage's name (unique in the task)."},
                "ttl": {
                    "type": "string",
                    "pattern": DURATION,
                    "maxLength": 32,
                    "x-kubernetes-validations": [BOUNDED_DURATION],
                    "description": "How long this stage may be live (default, and at most: the "
                    "task's ttl, which caps the whole task).",
                },
                "access": access,
            },
        },
    }


def subject_ref(what: str) -> dict:
    return {
        "type": "object",
        "required": ["kind", "name"],
        "properties": {
            "kind": {
                "type": "string",
                "enum": ["User", "Group", "ServiceAccount"],
                "description": "User, Group or ServiceAccount.",
            },
            "name": {**NAME, "description": "User name, group or ServiceAccount."},
            "namespace": {
                **DNS_LABEL,
                "description": "The ServiceAccount's namespace (kind ServiceAccount).",
            },
        },
        "x-kubernetes-validations": [
            {
                "rule": "self.kind != 'ServiceAccount' || has(self.namespace)",
                "message": f"a ServiceAccount {what} needs its namespace",
            }
        ],
    }


APPROVAL_SPEC = {
    "type": "object",
    "description": "One person's (or bot's) decision on one AgentTask. Immutable.",
    "required": ["taskName", "taskUID", "decision"],
    "properties": {
        "taskName": {**NAME, "description": "The AgentTask (in this namespace)."},
        "taskUID": {
            "type": "string",
            "minLength": 1,
            "maxLength": 64,
            "description": "The AgentTask's metadata.uid: an approval is for this exact task, "
            "never for a later one of the same name.",
        },
        "decision": {
            "type": "string",
            "enum": ["Approve", "Deny"],
            "description": "Approve or Deny.",
        },
        "comment": {"type": "string", "maxLength": 1024, "description": "Why (for the record)."},
        "stage": {
            **NAME,
            "description": "Staged tasks only: the stage decided on (default: the one waiting).",
        },
        "approver": {
            **IDENTITY,
            "description": "Who decided: set at admission from the API server's record of the "
            "request; whatever a client writes here is replaced.",
        },
    },
    "x-kubernetes-validations": [
        {
            "rule": "self == oldSelf",
            "message": "an AgentTaskApproval is immutable: delete it and make another",
        },
    ],
}


POLICY_STATUS = {
    "type": "object",
    "description": "Written by the operator: whether the policy is usable.",
    "properties": {
        "conditions": {
            "type": "array",
            "description": "Type Ready: False (reason InvalidCondition, InvalidIntentPattern, "
            "InvalidSpec) when the policy matches nothing because part of it cannot be used.",
            "items": CONDITION,
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    },
}
READY = {
    "name": "Ready",
    "type": "string",
    "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
}


TASK_SPEC["properties"]["stages"] = _stages_schema()
TASK_SPEC["properties"]["stage"] = {
    **DNS_LABEL,
    "description": "Staged tasks: the current stage (default: the first). May only move "
    "forward; moving it removes the previous stage's access first.",
}


def policy_spec(cluster: bool) -> dict:
    spec = {
        "type": "object",
        "description": (
            "Which agents may get what in the namespaces the selector chooses."
            if cluster
            else "Which agents may get what in this namespace."
        ),
        "required": ["subjects", "rules"],
        "properties": {
            "subjects": {
                "type": "array",
                "minItems": 1,
                "maxItems": 256,
                "description": "Agents that may request access.",
                "items": {
                    "type": "object",
                    "required": ["namespace", "serviceAccount"],
                    "properties": {
                        "namespace": {**DNS_LABEL, "description": "Namespace the agent runs in."},
                        "serviceAccount": {**NAME, "description": "The agent's ServiceAccount."},
                    },
                },
            },
            "rules": {
                "type": "array",
                "minItems": 1,
                "maxItems": 256,
                "description": "The ceiling: rules that may be granted.",
                "items": with_recheck(rule_schema(request=False)),
            },
            "idleTimeout": {
                "type": "string",
                "pattern": DURATION,
                "maxLength": 32,
                "x-kubernetes-validations": [
                    BOUNDED_DURATION,
                    {
                        "rule": "duration(self) >= duration('10s')",
                        "message": "must be at least 10s",
                    },
                ],
                "description": "A grant this policy covers with no call for this long ends "
                "(Expired, IdleTimeout). Calls are seen by the operator's authorization "
                "webhook or the API server's audit events (docs/authorization-webhook.md); "
                "without either, a grant ends this long after it was issued.",
            },
            "maxTTL": {
                "type": "string",
                "default": "1h",
                "pattern": DURATION,
                "maxLength": 32,
                "x-kubernetes-validations": [BOUNDED_DURATION],
                "description": "Longest grant this policy allows (Go duration). Default 1h.",
            },
            "requirePod": {
                "type": "boolean",
                "default": False,
                "description": "If true, tasks must name a pod (spec.podName).",
            },
            "requesters": {
                "type": "array",
                "maxItems": 64,
                "description": "Who may create tasks this policy covers (absent: anyone "
                "allowed by RBAC to create AgentTasks). A ServiceAccount listed here may also "
                "ask on behalf of other agents of its namespace.",
                "items": subject_ref("requester"),
            },
            "approval": {
                "type": "object",
                "description": "Human approval: a task this policy covers waits (Pending, "
                "AwaitingApproval, nothing issued) until `required` distinct approvers decide "
                "Approve; one eligible Deny ends it (Denied, ApprovalDenied); no decision "
                "within `timeout` of the task's creation ends it (Expired, ApprovalTimeout).",
                "properties": {
                    "required": {
                        "type": "integer",
                        "minimum": 0,
                        "maximum": 16,
                        "description": "Distinct approvals needed (absent or 0: none).",
                    },
                    "approvers": {
                        "type": "array",
                        "maxItems": 64,
                        "description": "Who may approve or deny (any of).",
                        "items": subject_ref("approver"),
                    },
                    "timeout": {
                        "type": "string",
                        "default": "1h",
                        "pattern": DURATION,
                        "maxLength": 32,
                        "x-kubernetes-validations": [BOUNDED_DURATION],
                        "description": "How long a task may wait for approval, from its "
                        "creation (Go duration). Default 1h.",
                    },
                },
                "x-kubernetes-validations": [
                    {
                        "rule": "!has(self.required) || self.required == 0 || "
                        "(has(self.approvers) && size(self.approvers) > 0)",
                        "message": "approval.required needs approvers who may approve",
                    }
                ],
            },
            "conditions": {
                "type": "array",
                "maxItems": 16,
                "description": "CEL expressions that must all be true for this policy to cover "
                "a task, at grant time and for as long as the grant lives. Variables: task, "
                "agent, namespace (the target), pod (or null), requester, now.",
                "items": {
                    "type": "object",
                    "required": ["expression"],
                    "properties": {
                        "expression": {
                            "type": "string",
                            "minLength": 1,
                            "maxLength": 4096,
                            "description": "A CEL expression returning bool.",
                        },
                        "message": {
                            "type": "string",
                            "maxLength": 1024,
                            "description": "Shown when the condition does not hold.",
                        },
                    },
                },
            },
            "intent": {
                "type": "object",
                "description": "Rules on the task's stated intent.",
                "properties": {
                    "pattern": {
                        "type": "string",
                        "maxLength": 1024,
                        "description": "RE2 pattern the intent must match (unanchored: use "
                        "^...$ for the whole intent), e.g. ^(INC|CHG)-[0-9]+: .{10,}",
                    }
                },
            },
            "maxActiveTasks": {
                "type": "integer",
                "minimum": 1,
                "maximum": 10000,
                "description": "Per agent: how many live tasks this policy may cover at once.",
            },
            "presets": {
                "type": "object",
                "maxProperties": 32,
                "description": "Named rule sets tasks may ask for by name (access[].preset). "
                "A preset's rules are part of what this policy may grant.",
                "additionalProperties": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 64,
                    "items": rule_schema(request=False),
                },
            },
            "allowedAudiences": strings(
                "Token audiences besides the API server's own that tasks covered by this "
                "policy may ask for (default: none). Every covering policy must allow one.",
                max_items=16,
                wildcard=False,
            ),
        },
    }
    if cluster:
        spec["required"].append("namespaceSelector")
        spec["properties"]["namespaceSelector"] = {
            "type": "object",
            "description": "A standard label selector choosing the target namespaces this "
            "policy governs. An empty selector matches no namespace.",
            "properties": {
                "matchLabels": {
                    "type": "object",
                    "additionalProperties": {"type": "string"},
                    "description": "Namespaces whose labels include all of these key/value pairs.",
                },
                "matchExpressions": {
                    "type": "array",
                    "description": "Label requirements, all of which must hold.",
                    "items": {
                        "type": "object",
                        "required": ["key", "operator"],
                        "properties": {
                            "key": {"type": "string", "description": "The label key."},
                            "operator": {
                                "type": "string",
                                "enum": ["In", "NotIn", "Exists", "DoesNotExist"],
                                "description": "In, NotIn, Exists or DoesNotExist.",
                            },
                            "values": {
                                "type": "array",
                                "items": {"type": "string"},
                                "description": "Values for In and NotIn; empty for Exists "
                                "and DoesNotExist.",
                            },
                        },
                    },
                },
            },
        }
    return spec


def undescribed(schema: dict, path: str = "") -> list[str]:
    """Fields `kubectl explain` would show without a description (array items of a
    scalar type are not fields of their own)."""
    out = []
    for name, sub in (schema.get("properties") or {}).items():
        here = f"{path}.{name}" if path else name
        if here == "metadata":  # ObjectMeta, described by the API server
            continue
        if not sub.get("description"):
            out.append(here)
        out += undescribed(sub, here)
        items = sub.get("items")
        if isinstance(items, dict) and items.get("type") == "object":
            out += undescribed(items, f"{here}[]")
    return out


def main() -> None:
    outs = [ROOT / "crds", ROOT / "charts" / "agent-access-operator" / "files" / "crds"]
    docs = {
        "agenttasks.yaml": crd(
            "AgentTask",
            "agenttasks",
            "at",
            "Namespaced",
            TASK_SPEC,
            TASK_STATUS,
            [
                {"name": "Agent", "type": "string", "jsonPath": ".spec.agent"},
                {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                {"name": "Reason", "type": "string", "jsonPath": ".status.reason"},
                {"name": "Expires", "type": "string", "jsonPath": ".status.expiresAt"},
                AGE,
                {"name": "Stage", "type": "string", "jsonPath": ".status.stage", "priority": 1},
                {"name": "Intent", "type": "string", "jsonPath": ".spec.intent", "priority": 1},
                {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 1},
            ],
            "One agent's request for access for one bounded task.",
        ),
        "agenttaskapprovals.yaml": crd(
            "AgentTaskApproval",
            "agenttaskapprovals",
            "ata",
            "Namespaced",
            APPROVAL_SPEC,
            None,
            [
                {"name": "Task", "type": "string", "jsonPath": ".spec.taskName"},
                {"name": "Decision", "type": "string", "jsonPath": ".spec.decision"},
                {"name": "Approver", "type": "string", "jsonPath": ".spec.approver.username"},
                AGE,
                {"name": "Comment", "type": "string", "jsonPath": ".spec.comment", "priority": 1},
            ],
            "A decision (Approve or Deny) on one AgentTask waiting for human approval.",
        ),
        "accesspolicies.yaml": crd(
            "AccessPolicy",
            "accesspolicies",
            "ap",
            "Namespaced",
            policy_spec(False),
            POLICY_STATUS,
            [
                READY,
                AGE,
                {"name": "MaxTTL", "type": "string", "jsonPath": ".spec.maxTTL", "priority": 1},
            ],
            "Governs access INTO its own namespace: which agents may get what here.",
        ),
        "clusteraccesspolicies.yaml": crd(
            "ClusterAccessPolicy",
            "clusteraccesspolicies",
            "cap",
            "Cluster",
            policy_spec(True),
            POLICY_STATUS,
            [
                READY,
                AGE,
                {"name": "MaxTTL", "type": "string", "jsonPath": ".spec.maxTTL", "priority": 1},
            ],
            "Like AccessPolicy, for platform teams: governs the namespaces its "
            "namespaceSelector chooses.",
        ),
    }
    for name, doc in docs.items():
        missing = undescribed(doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
        if missing:
            raise SystemExit(f"{name}: fields without a description: {', '.join(missing)}")
    header = "# Generated by hack/gen_crds.py; do not edit.\n"
    for out in outs:
        out.mkdir(parents=True, exist_ok=True)
        for name, doc in docs.items():
            text = header + yaml.safe_dump(doc, sort_keys=False, width=100)
            (out / name).write_text(text)
    # The admission policies these protections need. crds/ carries the default
    # install's operator identity (cluster admins are always trusted); the chart
    # renders the same file with its own identity (templates/admission-policies.yaml).
    policies = (
        header
        + ADMISSION_NOTE
        + "---\n".join(
            yaml.safe_dump(doc, sort_keys=False, width=100) for doc in admission.policies()
        )
    )
    (ROOT / "crds" / "admission-policies.yaml").write_text(policies)
    chart_files = ROOT / "charts" / "agent-access-operator" / "files" / "admission"
    chart_files.mkdir(parents=True, exist_ok=True)
    (chart_files / "admission-policies.yaml").write_text(policies)


if __name__ == "__main__":
    main()
