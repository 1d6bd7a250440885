"""Names fixed by the API contract (shared/API.md): group, kinds, phases, reasons.

Purely declarative: no I/O.
"""

from __future__ import annotations

from enum import StrEnum

GROUP = "agentaccess.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

TASKS = "agenttasks"
APPROVALS = "agenttaskapprovals"
POLICIES = "accesspolicies"
CLUSTER_POLICIES = "clusteraccesspolicies"

DEFAULT_TTL = "15m"
DEFAULT_MAX_TTL = "1h"
DEFAULT_APPROVAL_TIMEOUT = "1h"
#: TokenRequest refuses lifetimes under 10 minutes; short TTLs are enforced by revocation.
MIN_TOKEN_SECONDS = 600

# Labels and annotations on everything the operator creates.
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "agent-access-operator"
LABEL_TASK_UID = f"{GROUP}/task-uid"
LABEL_TASK_NAME = f"{GROUP}/task-name"
LABEL_TASK_NAMESPACE = f"{GROUP}/task-namespace"
FINALIZER = f"{GROUP}/revoke"
SECRET_TYPE = f"{GROUP}/token"
#: On the per-task ServiceAccount: the grant's deadline and binding, written only by the
#: operator (admission refuses everyone else). Restarts read them, never the task status.
ANNOTATION_EXPIRES_AT = f"{GROUP}/expires-at"
ANNOTATION_GRANTED_AT = f"{GROUP}/granted-at"
ANNOTATION_POD_UID = f"{GROUP}/pod-uid"
ANNOTATION_POLICIES = f"{GROUP}/policies"
#: The rules each preset entry was granted (JSON {namespace: rules}): a restart re-checks
#: what was granted, not what the preset says now.
ANNOTATION_PRESET_RULES = f"{GROUP}/preset-rules"
#: Staged tasks: the whole task's deadline (first grant + spec.ttl) and the stage live.
ANNOTATION_TASK_EXPIRES_AT = f"{GROUP}/task-expires-at"
ANNOTATION_STAGE = f"{GROUP}/stage"
#: Stamped on each AgentTask at admission (MutatingAdmissionPolicy) from the API server's
#: own record of who created it; clients cannot set or change them.
ANNOTATION_REQUESTER_USERNAME = f"{GROUP}/requester-username"
ANNOTATION_REQUESTER_UID = f"{GROUP}/requester-uid"
ANNOTATION_REQUESTER_GROUPS = f"{GROUP}/requester-groups"
#: Name prefix of every per-task ServiceAccount (admission policies key on it).
IDENTITY_PREFIX = "aat-"
#: Longest duration accepted anywhere (ttl, maxTTL): one year.
MAX_DURATION_SECONDS = 366 * 24 * 3600
#: A namespace labelled with this ("true") is never granted into (and admission keeps
#: the operator's own identity out of it).
LABEL_PROTECTED = f"{GROUP}/protected"
#: A decision compares each requested combination with the rules of the policies that
#: apply; above this many comparisons the task is Denied InvalidSpec (about a second).
MAX_COVERAGE_CHECKS = 1_000_000
#: A task's evaluation cost is bounded: requests expanding to more (apiGroup, resource,
#: verb, name) combinations than this are Denied InvalidSpec.
MAX_REQUEST_ATOMS = 20_000
#: A staged task has 1 to this many stages.
MAX_STAGES = 16


class Phase(StrEnum):
    PENDING = "Pending"
    ACTIVE = "Active"
    DENIED = "Denied"
    EXPIRED = "Expired"
    COMPLETED = "Completed"
    CANCELLED = "Cancelled"
    REVOKED = "Revoked"
    FAILED = "Failed"

    @property
    def terminal(self) -> bool:
        return self not in (Phase.PENDING, Phase.ACTIVE)


class Reason(StrEnum):
    # Pending (not terminal: a task waiting for human approval issues nothing)
    AWAITING_APPROVAL = "AwaitingApproval"
    # Active
    POLICY_ALLOWED = "PolicyAllowed"
    # Denied
    NO_MATCHING_POLICY = "NoMatchingPolicy"
    RULE_NOT_ALLOWED = "RuleNotAllowed"
    FORBIDDEN = "Forbidden"
    INVALID_SPEC = "InvalidSpec"
    AGENT_NOT_FOUND = "AgentNotFound"
    POD_NOT_FOUND = "PodNotFound"
    REQUESTER_NOT_ALLOWED = "RequesterNotAllowed"
    AUDIENCE_NOT_ALLOWED = "AudienceNotAllowed"
    AGENT_SUSPENDED = "AgentSuspended"  # also Revoked
    APPROVAL_DENIED = "ApprovalDenied"
    INTENT_REJECTED = "IntentRejected"
    LIMIT_EXCEEDED = "LimitExceeded"
    CONDITION_FAILED = "ConditionFailed"  # also Revoked
    # Expired / Completed / Cancelled
    TTL_EXPIRED = "TTLExpired"
    APPROVAL_TIMEOUT = "ApprovalTimeout"
    IDLE_TIMEOUT = "IdleTimeout"
    POD_SUCCEEDED = "PodSucceeded"
    POD_FAILED = "PodFailed"
    CANCELLED = "Cancelled"
    DRY_RUN = "DryRun"
    STAGES_DONE = "StagesDone"
    # Revoked
    POD_DELETED = "PodDeleted"
    POLICY_CHANGED = "PolicyChanged"
    POLICY_DELETED = "PolicyDeleted"
    # Failed
    ISSUE_FAILED = "IssueFailed"
    # Only in the Event and audit line written as the task goes.
    TASK_DELETED = "TaskDeleted"


#: The phase a grant ends in, for each reason that ends one.
END_PHASE: dict[Reason, Phase] = {
    Reason.TTL_EXPIRED: Phase.EXPIRED,
    Reason.APPROVAL_TIMEOUT: Phase.EXPIRED,
    Reason.IDLE_TIMEOUT: Phase.EXPIRED,
    Reason.POD_SUCCEEDED: Phase.COMPLETED,
    Reason.POD_FAILED: Phase.COMPLETED,
    Reason.CANCELLED: Phase.CANCELLED,
    Reason.DRY_RUN: Phase.COMPLETED,
    Reason.STAGES_DONE: Phase.COMPLETED,
    Reason.POLICY_CHANGED: Phase.REVOKED,
    Reason.POLICY_DELETED: Phase.REVOKED,
    Reason.POD_DELETED: Phase.REVOKED,
    Reason.AGENT_NOT_FOUND: Phase.REVOKED,
    Reason.AGENT_SUSPENDED: Phase.REVOKED,
    Reason.CONDITION_FAILED: Phase.REVOKED,
    Reason.ISSUE_FAILED: Phase.FAILED,
    Reason.TASK_DELETED: Phase.REVOKED,
}

#: Verbs that change objects (used by the write guardrail).
WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})

#: The operator's own API: never writable with a grant (a token could write itself a policy).
OWN_RESOURCES = frozenset(
    {
        "agenttasks",
        "agenttasks/status",
        "accesspolicies",
        "clusteraccesspolicies",
        "agenttaskapprovals",
    }
)
