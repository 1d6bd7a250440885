"""What approvals add up to (approval.py): pure rules, no cluster."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from agent_access.approval import (
    APPROVED,
    DENIED,
    TIMED_OUT,
    WAITING,
    TaskRef,
    Vote,
    assess,
    parse_vote,
    requiring,
)
from agent_access.engine import ApprovalRule, Policy, Requester, SpecError, parse_policy
from agent_access.notify import event_type

T0 = datetime(2026, 12, 5, 10, 0, tzinfo=UTC)
TASK = TaskRef("uid-1", "agents", "bot", Requester("carol", "", ("dev",)), T0)


def policy(name="p", required=2, approvers=(("User", "", "alice"), ("Group", "", "oncall")),
           timeout=timedelta(hours=1)) -> Policy:  # fmt: skip
    return Policy(
        name=name,
        namespace="target",
        subjects=frozenset({("agents", "bot")}),
        rules=(),
        max_ttl=timedelta(hours=1),
        approval=ApprovalRule(required, frozenset(approvers), timeout),
    )


def vote(user, decision="Approve", groups=(), at=1, uid="uid-1", name=None, **kw) -> Vote:
    return Vote(
        name=name or f"{user}-{at}",
        namespace="agents",
        task_uid=uid,
        task_name="t",
        decision=decision,
        comment=kw.get("comment", ""),
        stage=kw.get("stage", ""),
        approver=Requester(user, "", tuple(groups)) if user else None,
        created=T0 + timedelta(seconds=at),
    )


def test_waits_until_enough_distinct_eligible_approvers():
    p = [policy()]
    out = assess(TASK, p, [vote("alice")], T0 + timedelta(seconds=5))
    assert out.state == WAITING and "1 of 2" in out.message
    out = assess(TASK, p, [vote("alice"), vote("alice", at=2)], T0 + timedelta(seconds=5))
    assert out.state == WAITING
    assert [a["counted"] for a in out.approvals] == [True, False]
    assert "duplicate" in out.approvals[1]["reason"]
    out = assess(TASK, p, [vote("alice"), vote("bob", groups=("oncall",), at=2)], T0)
    assert out.state == APPROVED and out.message == "approved by alice, bob"


@pytest.mark.parametrize(
    ("who", "why"),
    [
        (vote("carol", groups=("oncall",)), "created the task"),
        (vote("system:serviceaccount:agents:bot", groups=("oncall",)), "task's agent"),
        (vote("system:serviceaccount:agents:aat-x-1", groups=("oncall",)), "per-task identity"),
        (vote("eve"), "not an eligible approver"),
        (vote(""), "no approver recorded"),
        (vote("alice", at=3601 + 1), "after the approval timeout"),
        (vote("alice", stage="deploy"), "no stages"),
    ],
)
def test_decisions_that_never_count(who, why):
    out = assess(TASK, [policy(required=1)], [who], T0)
    assert out.approvals[0]["counted"] is False
    assert why in out.approvals[0]["reason"]


def test_one_eligible_denial_ends_it_an_ineligible_one_does_not():
    p = [policy()]
    out = assess(TASK, p, [vote("eve", "Deny"), vote("alice")], T0)
    assert out.state == WAITING
    out = assess(TASK, p, [vote("alice"), vote("bob", "Deny", ("oncall",), comment="no")], T0)
    assert out.state == DENIED and out.message == "denied by bob: no"


def test_each_policy_needs_its_own_approvers_and_the_smallest_timeout_counts():
    a = policy("a", 1, [("User", "", "alice")], timedelta(minutes=30))
    b = policy("b", 1, [("ServiceAccount", "ops", "bot")], timedelta(hours=2))
    out = assess(TASK, [a, b], [vote("alice")], T0)
    assert out.state == WAITING and "target/b: 0 of 1" in out.message
    assert out.deadline == T0 + timedelta(minutes=30)
    out = assess(TASK, [a, b], [vote("alice"), vote("system:serviceaccount:ops:bot")], T0)
    assert out.state == APPROVED
    out = assess(TASK, [a, b], [vote("alice")], T0 + timedelta(minutes=30))
    assert out.state == TIMED_OUT


def test_approvals_made_before_the_timeout_count_even_when_read_after_it():
    out = assess(TASK, [policy(required=1)], [vote("alice", at=10)], T0 + timedelta(days=1))
    assert out.state == APPROVED


def test_other_tasks_votes_are_ignored():
    out = assess(TASK, [policy(required=1)], [vote("alice", uid="uid-other")], T0)
    assert out.state == WAITING and out.approvals == []


def test_parse_vote_is_total():
    for body in ({}, {"spec": []}, {"spec": {"approver": {"username": 3}}}, {"metadata": 5}):
        v = parse_vote(body)
        assert v is None or v.approver is None
    v = parse_vote(
        {
            "metadata": {
                "name": "a",
                "namespace": "n",
                "creationTimestamp": "2026-12-05T10:00:01Z",
            },
            "spec": {
                "taskUID": "u",
                "taskName": "t",
                "decision": "Approve",
                "approver": {"username": "alice", "groups": ["g", 3]},
            },
        }
    )
    assert v is not None and v.approver == Requester("alice", "", ())
    assert v.created == T0 + timedelta(seconds=1)


def test_policy_approval_parsing():
    base = {
        "kind": "AccessPolicy",
        "metadata": {"name": "p", "namespace": "n"},
        "spec": {"subjects": [], "rules": []},
    }
    assert parse_policy(base).approval is None
    zero = dict(base, spec=dict(base["spec"], approval={"required": 0}))
    assert parse_policy(zero).approval is None
    two = dict(
        base,
        spec=dict(
            base["spec"],
            approval={"required": 2, "approvers": [{"kind": "User", "name": "a"}]},
        ),
    )
    rule = parse_policy(two).approval
    assert rule is not None and rule.timeout == timedelta(hours=1) and rule.required == 2
    assert requiring([parse_policy(two), parse_policy(base)]) == [parse_policy(two)]
    for bad in ({"required": -1}, {"required": "2"}, {"required": 1, "timeout": "soon"}, []):
        with pytest.raises(SpecError):
            parse_policy(dict(base, spec=dict(base["spec"], approval=bad)))


def test_notifications_for_approval_events():
    assert event_type({"event": "pending"}) == "io.agentaccess.task.pending"
    counted = {"event": "approval", "approval": {"counted": True, "decision": "Approve"}}
    assert event_type(counted) == "io.agentaccess.task.approved"
    not_counted = {"event": "approval", "approval": {"counted": False, "decision": "Approve"}}
    assert event_type(not_counted) is None
    deny = {"event": "approval", "approval": {"counted": True, "decision": "Deny"}}
    assert event_type(deny) is None  # the denial itself is sent as `denied`


def test_status_lists_every_counted_decision_and_a_bounded_number_of_others():
    from agent_access.approval import MAX_UNCOUNTED

    spam = [vote(f"eve{i}", at=1 + i) for i in range(100)]
    out = assess(TASK, [policy()], [vote("alice"), *spam, vote("bob", groups=("oncall",), at=200)],
                 T0)  # fmt: skip
    assert out.state == APPROVED
    assert len(out.approvals) == 2 + MAX_UNCOUNTED
    assert [a["approver"]["username"] for a in out.approvals if a["counted"]] == ["alice", "bob"]
    assert len(out.every) == 102  # the audit trail keeps them all
