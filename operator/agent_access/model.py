"""Names fixed by the API contract (shared/API.md): group, kinds, phases, reasons.

Purely declarative: no I/O.
"""

from __future__ import annotations

from enum import StrEnum

GROUP = "agentaccess.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

TASKS = "agenttasks"
POLICIES = "accesspolicies"
CLUSTER_POLICIES = "clusteraccesspolicies"

DEFAULT_TTL = "15m"
DEFAULT_MAX_TTL = "1h"
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
    # Active
    POLICY_ALLOWED = "PolicyAllowed"
    # Denied
    NO_MATCHING_POLICY = "NoMatchingPolicy"
    RULE_NOT_ALLOWED = "RuleNotAllowed"
    FORBIDDEN = "Forbidden"
    INVALID_SPEC = "InvalidSpec"
    AGENT_NOT_FOUND = "AgentNotFound"
    POD_NOT_FOUND = "PodNotFound"
    # Expired / Completed / Cancelled
    TTL_EXPIRED = "TTLExpired"
    POD_SUCCEEDED = "PodSucceeded"
    POD_FAILED = "PodFailed"
    CANCELLED = "Cancelled"
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
    Reason.POD_SUCCEEDED: Phase.COMPLETED,
    Reason.POD_FAILED: Phase.COMPLETED,
    Reason.CANCELLED: Phase.CANCELLED,
    Reason.POLICY_CHANGED: Phase.REVOKED,
    Reason.POLICY_DELETED: Phase.REVOKED,
    Reason.POD_DELETED: Phase.REVOKED,
    Reason.AGENT_NOT_FOUND: Phase.REVOKED,
    Reason.ISSUE_FAILED: Phase.FAILED,
    Reason.TASK_DELETED: Phase.REVOKED,
}

#: Verbs that change objects (used by the write guardrail).
WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})
