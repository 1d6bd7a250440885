"""Human approval: which AgentTaskApprovals count for a task, and what they add up to.

Purely computational: the caller gathers the task, the policies that cover it and
the approvals made for it (by UID), and passes the clock. The rules (API.md,
"Human approval"; docs/approval.md):

- Each covering policy with `approval.required` N needs N approvals from distinct
  identities among its `approvers` (User, Group, ServiceAccount). One approver
  eligible for several policies counts for each of them.
- One Deny from an approver eligible for any of those policies ends the task.
- Never counted, with the reason in `status.approvals[]`: no approver recorded
  (admission policies not installed), the task's requester, its agent, any
  per-task identity (refused at admission already; checked again here), an
  approver none of the policies lists, an identity that already decided (the
  first decision of each identity is the one that counts), a decision made after
  the approval timeout, a stage on a task without stages.
- The timeout (the smallest of the policies') counts from the task's creation,
  so it holds across operator restarts; decisions are placed in time by their
  own creationTimestamp, set by the API server.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .engine import SA_PREFIX, Policy, Requester, requester_listed
from .model import IDENTITY_PREFIX

APPROVE = "Approve"
DENY = "Deny"


@dataclass(frozen=True, slots=True)
class Vote:
    """One AgentTaskApproval, as the operator keeps it."""

    name: str
    namespace: str
    task_uid: str
    task_name: str
    decision: str
    comment: str
    stage: str
    #: stamped at admission from the API server's record of the request
    approver: Requester | None
    created: datetime | None


def parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None


def parse_vote(body: Mapping[str, Any]) -> Vote | None:
    """An AgentTaskApproval; None when it cannot be one (total: hostile shapes too)."""
    try:
        meta = body.get("metadata") or {}
        spec = body.get("spec") or {}
        who = spec.get("approver")
        approver = None
        if isinstance(who, Mapping) and isinstance(who.get("username"), str) and who["username"]:
            groups = who.get("groups") or []
            if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
                groups = []
            uid = who.get("uid")
            approver = Requester(
                who["username"], uid if isinstance(uid, str) else "", tuple(groups)
            )
        decision = spec.get("decision")
        comment = spec.get("comment")
        stage = spec.get("stage")
        return Vote(
            name=str(meta.get("name") or ""),
            namespace=str(meta.get("namespace") or ""),
            task_uid=str(spec.get("taskUID") or ""),
            task_name=str(spec.get("taskName") or ""),
            decision=decision if decision in (APPROVE, DENY) else "",
            comment=comment[:1024] if isinstance(comment, str) else "",
            stage=stage if isinstance(stage, str) else "",
            approver=approver,
            created=parse_time(meta.get("creationTimestamp")),
        )
    except Exception:
        return None


@dataclass(frozen=True, slots=True)
class TaskRef:
    """What the rules need to know of the task."""

    uid: str
    namespace: str
    agent: str
    requester: Requester | None
    #: when the wait began: the task's creation, or for a later stage of a staged task,
    #: when that stage began (the approval timeout counts from here)
    created: datetime
    #: staged tasks: the stage waiting
    stage: str | None = None


#: status.approvals lists every counted decision and at most this many others (the
#: newest): approvals anyone may create cannot grow a task's status without bound.
MAX_UNCOUNTED = 16

WAITING = "waiting"
APPROVED = "approved"
DENIED = "denied"
TIMED_OUT = "timeout"


@dataclass(frozen=True, slots=True)
class Outcome:
    state: str  # WAITING | APPROVED | DENIED | TIMED_OUT
    message: str
    #: status.approvals[]: every decision made for the task, counted or not
    approvals: list[dict[str, Any]] = field(default_factory=list)
    deadline: datetime | None = None
    #: for the audit line only (policy names and counts)
    detail: str = ""
    #: every decision (status.approvals is bounded, the audit trail is not)
    every: list[dict[str, Any]] = field(default_factory=list)


def requiring(policies: Sequence[Policy]) -> list[Policy]:
    """The covering policies that require approval."""
    return [p for p in policies if p.approval is not None and p.approval.required > 0]


def deadline_of(task: TaskRef, policies: Sequence[Policy]) -> datetime:
    return task.created + min(p.approval.timeout for p in policies if p.approval)


def rfc3339(moment: datetime | None) -> str | None:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ") if moment else None


def _not_counted(vote: Vote, task: TaskRef, deadline: datetime, eligible: list[Policy]) -> str:
    """Why a decision does not count ("" when it does)."""
    who = vote.approver
    if who is None:
        return "no approver recorded (the admission policies are not installed)"
    if not vote.decision:
        return "decision is neither Approve nor Deny"
    if vote.stage and task.stage is None:
        return f"for stage {vote.stage!r}, but the task has no stages"
    if vote.stage and vote.stage != task.stage:
        return f"for stage {vote.stage!r}, not the stage waiting ({task.stage})"
    if vote.created is None or vote.created > deadline:
        return "made after the approval timeout"
    if task.stage is not None and not vote.stage and vote.created < task.created:
        return "made before this stage was waiting (name the stage to decide on it ahead)"
    if task.requester is not None and who.username == task.requester.username:
        return "self-approval: the approver created the task"
    if who.username == f"{SA_PREFIX}{task.namespace}:{task.agent}":
        return "self-approval: the approver is the task's agent"
    sa = who.service_account()
    if sa and sa[1].startswith(IDENTITY_PREFIX):
        return "a per-task identity never approves"
    if not eligible:
        return "not an eligible approver of the policies that require approval"
    return ""


def assess(
    task: TaskRef, policies: Sequence[Policy], votes: Sequence[Vote], now: datetime
) -> Outcome:
    """What the decisions made so far add up to, for the policies that require approval
    (callers pass `requiring(covering)`, non-empty)."""
    deadline = deadline_of(task, policies)
    mine = [v for v in votes if v.task_uid == task.uid]
    mine.sort(key=lambda v: (v.created or datetime.max.replace(tzinfo=UTC), v.name))
    entries: list[dict[str, Any]] = []
    decided: set[str] = set()
    approvers: dict[str, set[str]] = {p.key: set() for p in policies}
    denial: Vote | None = None
    for vote in mine:
        who = vote.approver
        eligible = (
            [p for p in policies if p.approval and requester_listed(p.approval.approvers, who)]
            if who
            else []
        )
        why = _not_counted(vote, task, deadline, eligible)
        if not why and who is not None and who.username in decided:
            why = "duplicate approver: this identity's first decision is the one that counts"
        entry: dict[str, Any] = {
            "name": vote.name,
            "approver": who.to_dict() if who else None,
            "decision": vote.decision or None,
            "comment": vote.comment or None,
            "time": rfc3339(vote.created),
            "counted": not why,
        }
        if why:
            entry["reason"] = why
        entries.append({k: v for k, v in entry.items() if v is not None})
        if why or who is None:
            continue
        decided.add(who.username)
        if vote.decision == DENY:
            denial = denial or vote
        else:
            for p in eligible:
                approvers[p.key].add(who.username)
    every = entries
    uncounted = [i for i, e in enumerate(entries) if not e["counted"]]
    dropped = set(uncounted[:-MAX_UNCOUNTED]) if len(uncounted) > MAX_UNCOUNTED else set()
    entries = [e for i, e in enumerate(entries) if i not in dropped]
    if denial is not None and denial.approver is not None:
        because = f": {denial.comment}" if denial.comment else ""
        return Outcome(
            DENIED,
            f"denied by {denial.approver.username}{because}",
            entries,
            deadline,
            every=every,
        )
    missing = [
        (p, p.approval.required - len(approvers[p.key]))
        for p in policies
        if p.approval and len(approvers[p.key]) < p.approval.required
    ]
    if not missing:
        names = sorted({n for who in approvers.values() for n in who})
        return Outcome(APPROVED, f"approved by {', '.join(names)}", entries, deadline, every=every)
    detail = "; ".join(
        f"{p.key}: {len(approvers[p.key])} of {p.approval.required}"
        for p, _ in missing
        if p.approval
    )
    if now >= deadline:
        return Outcome(
            TIMED_OUT,
            f"no decision within the approval timeout (until {rfc3339(deadline)})",
            entries,
            deadline,
            detail,
            every,
        )
    return Outcome(
        WAITING,
        f"awaiting approval ({detail} approvals) until {rfc3339(deadline)}",
        entries,
        deadline,
        detail,
        every,
    )
