"""AgentTask status and its `Granted` condition, in Kubernetes conventions.

Purely computational, no side effects. One helper (`set_condition`) owns the
condition rules: lastTransitionTime changes only when the status flips, and
observedGeneration is always carried.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from .model import END_PHASE, Phase, Reason

CONDITION = "Granted"


def rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    existing: Sequence[Mapping[str, Any]] | None,
    status: bool,
    reason: str,
    message: str,
    generation: int | None,
    now: datetime,
    ctype: str = CONDITION,
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    previous = None
    for cond in existing or ():
        if cond.get("type") == ctype:
            previous = cond
        else:
            out.append(dict(cond))
    value = "True" if status else "False"
    changed = previous is None or previous.get("status") != value
    out.append(
        {
            "type": ctype,
            "status": value,
            "reason": reason,
            "message": message,
            "lastTransitionTime": rfc3339(now)
            if changed or previous is None
            else previous.get("lastTransitionTime") or rfc3339(now),
            "observedGeneration": generation,
        }
    )
    return out


def _base(
    task: Mapping[str, Any], requester: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], int | None]:
    status = dict(task.get("status") or {})
    if requester:
        status["requester"] = dict(requester)
    return status, task.get("metadata", {}).get("generation")


def denied(
    task: Mapping[str, Any],
    reason: Reason,
    message: str,
    now: datetime,
    requester: Mapping[str, Any] | None = None,
) -> dict:
    """Never granted; nothing was created."""
    return _final(task, Phase.DENIED, reason, message, now, requester)


def active(
    task: Mapping[str, Any],
    message: str,
    service_account: str,
    secret: str,
    granted_at: datetime,
    expires_at: datetime,
    policies: list[str],
    grants: list[dict[str, Any]],
    now: datetime,
    requester: Mapping[str, Any] | None = None,
) -> dict:
    status, generation = _base(task, requester)
    status.update(
        phase=Phase.ACTIVE.value,
        reason=Reason.POLICY_ALLOWED.value,
        message=message,
        observedGeneration=generation,
        serviceAccountName=service_account,
        tokenSecretName=secret,
        grantedAt=rfc3339(granted_at),
        expiresAt=rfc3339(expires_at),
        policies=policies,
        grants=grants,
    )
    status["conditions"] = set_condition(
        status.get("conditions"), True, Reason.POLICY_ALLOWED.value, message, generation, now
    )
    return status


def pending(
    task: Mapping[str, Any],
    reason: Reason,
    message: str,
    now: datetime,
    requester: Mapping[str, Any] | None,
    policies: list[str],
    approvals: list[dict[str, Any]],
) -> dict:
    """Not terminal: waiting (for approval); nothing is issued meanwhile."""
    status, generation = _base(task, requester)
    status.update(
        phase=Phase.PENDING.value,
        reason=reason.value,
        message=message,
        observedGeneration=generation,
        policies=policies,
        approvals=approvals,
    )
    status["conditions"] = set_condition(
        status.get("conditions"), False, reason.value, message, generation, now
    )
    return status


def ended(
    task: Mapping[str, Any],
    reason: Reason,
    message: str,
    now: datetime,
    requester: Mapping[str, Any] | None = None,
) -> dict:
    """A grant that was live (or being issued) has ended; the record stays for audit."""
    return _final(task, END_PHASE[reason], reason, message, now, requester)


def ended_as(
    task: Mapping[str, Any],
    phase: Phase,
    reason: Reason,
    message: str,
    now: datetime,
    requester: Mapping[str, Any] | None = None,
) -> dict:
    """A grant ends in this phase (a staged task whose next stage is denied: Denied)."""
    return _final(task, phase, reason, message, now, requester)


def dry_run(
    task: Mapping[str, Any],
    message: str,
    expires_at: datetime,
    policies: list[str],
    grants: list[dict[str, Any]],
    now: datetime,
    requester: Mapping[str, Any] | None = None,
) -> dict:
    """Decided as a real task would be, nothing issued: what would have been granted
    (no identity, no token, no Role names: none exist)."""
    status = _final(task, Phase.COMPLETED, Reason.DRY_RUN, message, now, requester)
    status.update(expiresAt=rfc3339(expires_at), policies=policies, grants=grants)
    return status


def _final(
    task: Mapping[str, Any],
    phase: Phase,
    reason: Reason,
    message: str,
    now: datetime,
    requester: Mapping[str, Any] | None,
) -> dict:
    status, generation = _base(task, requester)
    status.update(
        phase=phase.value,
        reason=reason.value,
        message=message,
        observedGeneration=generation,
        endedAt=rfc3339(now),
    )
    status["conditions"] = set_condition(
        status.get("conditions"), False, reason.value, message, generation, now
    )
    return status
