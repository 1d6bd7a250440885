"""Waiting for human approval: the service side of approval.py.

A task covered by a policy that requires approval is decided as usual; if the
policies allow it, `Awaiting.gate` counts the AgentTaskApprovals made for it
(watched, see facts.Cache) and either lets the grant go ahead, ends the task
(`Denied`/`ApprovalDenied`, `Expired`/`ApprovalTimeout`) or leaves it `Pending`/
`AwaitingApproval` with nothing issued. A waiting task is decided again, from
scratch, whenever something it waits on changes: an approval for it, a policy,
namespace or agent change, its timeout. Nothing of the wait lives only in
memory: a restart (or a new leader) lists the Pending tasks and decides each
again, and the timeout counts from the task's creationTimestamp.

A mixin of the grant service (service.py), like issuance.py.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from . import audit
from . import status as st
from .approval import (
    APPROVE,
    APPROVED,
    DENIED,
    TIMED_OUT,
    Outcome,
    TaskRef,
    Vote,
    assess,
    parse_time,
    requiring,
)
from .engine import Granted, TaskSpec
from .facts import Facts
from .informers import Key
from .issuance import _requested
from .model import Phase, Reason
from .runtime import Deadlines, Registry
from .stages import precise

log = logging.getLogger(__name__)

#: A wake-up whose read failed is tried again after this long.
WAKE_RETRY = timedelta(seconds=1)


class Waiting:
    """Tasks waiting for approval: who they are, when they time out, waking them.

    `wake(namespace, name)` (set by the task watch) hands the task, as the API
    server has it now, to its queue; it runs on `pool`, never on a watch thread.
    """

    def __init__(self) -> None:
        #: Wake-ups read the task: on threads of their own, so a burst of them never
        #: queues in front of revocations.
        self.pool = ThreadPoolExecutor(2, thread_name_prefix="wake")
        self.wake: Callable[[str, str], bool] | None = None
        self._lock = threading.Lock()
        self._tasks: dict[str, Key] = {}
        #: uid -> (target namespaces, agent): which changes concern a waiting task
        self._scope: dict[str, tuple[frozenset[str], str]] = {}
        #: uids whose wake-up is queued and not yet running (bursts coalesce)
        self._queued: set[str] = set()
        #: uid -> the decisions already recorded (audit line, Event): a handling that
        #: works from a task body older than its own last status write repeats none.
        self._announced: dict[str, set[str]] = {}
        #: Bumped by every approval event: a decision that read the approvals before
        #: one arrived looks again (see Awaiting.gate).
        self.generation = 0
        self.deadlines = Deadlines(self._wake)

    def wait(
        self, uid: str, key: Key, deadline: datetime, targets: Sequence[str] = (), agent: str = ""
    ) -> None:
        with self._lock:
            self._tasks[uid] = key
            self._scope[uid] = (frozenset(targets), agent)
        self.deadlines.schedule(uid, deadline)

    def announce(self, uid: str, names: set[str]) -> set[str]:
        """Of these decisions, those not recorded yet; from now on they are."""
        with self._lock:
            known = self._announced.setdefault(uid, set())
            new = names - known
            known |= new
            return new

    def done(self, uid: str) -> None:
        with self._lock:
            found = self._tasks.pop(uid, None)
            self._scope.pop(uid, None)
            self._announced.pop(uid, None)
        if found is not None:
            self.deadlines.cancel(uid)

    def count(self) -> int:
        with self._lock:
            return len(self._tasks)

    def on_vote(self, kind: str, key: Key, old: Vote | None, new: Vote | None) -> None:
        """An AgentTaskApproval event (watch thread: no I/O)."""
        with self._lock:
            self.generation += 1
        vote = new or old
        if vote is not None:
            self._wake(vote.task_uid)

    def wake_all(self) -> None:
        """Something every waiting task may depend on changed (a ClusterAccessPolicy):
        decide each again."""
        with self._lock:
            uids = list(self._tasks)
        for uid in uids:
            self._wake(uid)

    def wake_namespace(self, namespace: str) -> None:
        """A policy of this namespace, or the namespace itself, changed: the waiting
        tasks that ask for access there, or whose agents run there."""
        with self._lock:
            uids = [
                uid
                for uid, (targets, _) in self._scope.items()
                if namespace in targets or self._tasks[uid][0] == namespace
            ]
        for uid in uids:
            self._wake(uid)

    def wake_agent(self, namespace: str, agent: str) -> None:
        with self._lock:
            uids = [
                uid
                for uid, (_, who) in self._scope.items()
                if self._tasks[uid][0] == namespace and who == agent
            ]
        for uid in uids:
            self._wake(uid)

    def poke(self, uid: str) -> None:
        """Decide this waiting task again soon."""
        self._wake(uid)

    def _wake(self, uid: str) -> None:
        with self._lock:
            key = self._tasks.get(uid)
            if key is None or self.wake is None or uid in self._queued:
                return
            self._queued.add(uid)
        with contextlib.suppress(RuntimeError):  # shutting down
            self.pool.submit(self._wake_now, uid, key)

    def _wake_now(self, uid: str, key: Key) -> None:
        with self._lock:
            self._queued.discard(uid)
        try:
            woken = self.wake(*key) if self.wake else True
        except Exception as exc:
            log.warning("waking %s/%s failed (%s); again shortly", key[0], key[1], exc)
            woken = False
        if not woken:
            with self._lock:
                waiting = uid in self._tasks
            if waiting:
                self.deadlines.schedule(uid, datetime.now(UTC) + WAKE_RETRY)

    def stop(self) -> None:
        self.deadlines.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)


class Awaiting:
    """The approval step of a decision. Expects the attributes of `service.Service`."""

    audit: audit.AuditLog
    clock: Callable[[], datetime]
    facts: Facts
    waiting: Waiting
    registry: Registry
    ended: set[str]
    _first_seen: dict[str, datetime]

    if TYPE_CHECKING:  # provided by the service (issuance.py); not shadowed here

        def _write_status(self, task: Mapping[str, Any], status: Mapping[str, Any]) -> None: ...

        def _event(self, task: Mapping[str, Any], kind: str, reason: str, message: str,
                   action: str, spec: TaskSpec | None = None) -> None: ...  # fmt: skip

        def _close(self, task: Mapping[str, Any], spec: TaskSpec | None, phase: Phase,
                   reason: Reason, message: str, detail: str = "",
                   extra: Mapping[str, Any] | None = None) -> None: ...  # fmt: skip

    def gate(
        self,
        task: Mapping[str, Any],
        spec: TaskSpec,
        decision: Granted,
        since: datetime | None = None,
        end: Callable[[Phase, Reason, str, str, dict[str, Any]], None] | None = None,
    ) -> list[dict[str, Any]] | None:
        """The policies allow the task: may it be issued now? The decisions it rests on
        (status.approvals; empty when no policy requires approval), or None when it
        must not be issued now (waiting, or ended here). A later stage of a staged task
        waits from `since`, and ends through `end` (its identity exists)."""
        policies = requiring(decision.policies)
        meta = task["metadata"]
        uid = meta["uid"]
        if not policies:
            self.waiting.done(uid)  # a policy that required it no longer does
            return []
        now = self.clock()
        ref = TaskRef(
            uid=uid,
            namespace=spec.namespace,
            agent=spec.agent,
            requester=spec.requester,
            created=since or parse_time(meta.get("creationTimestamp")) or now,
            stage=spec.stage,
        )
        generation = self.waiting.generation
        outcome = assess(ref, policies, self.facts.votes(spec.namespace, uid), now)
        if outcome.state == TIMED_OUT:  # never on watched facts alone: read them
            outcome = assess(ref, policies, self.facts.votes(spec.namespace, uid, True), now)
        self._record_votes(task, spec, outcome)
        extra = {"approvals": outcome.approvals, "policies": decision.policy_keys}
        if outcome.state == APPROVED:
            self.waiting.done(uid)
            self._first_seen[uid] = self.clock()  # grant latency counts from here
            return outcome.approvals
        if outcome.state in (DENIED, TIMED_OUT):
            self.waiting.done(uid)
            phase, reason = (
                (Phase.DENIED, Reason.APPROVAL_DENIED)
                if outcome.state == DENIED
                else (Phase.EXPIRED, Reason.APPROVAL_TIMEOUT)
            )
            if end is not None:
                end(phase, reason, outcome.message, outcome.detail, extra)
            else:
                self._close(task, spec, phase, reason, outcome.message, outcome.detail, extra)
            return None
        self._await(task, spec, decision, outcome, ref.created)
        assert outcome.deadline is not None
        self.waiting.wait(
            uid, (spec.namespace, meta["name"]), outcome.deadline,
            spec.target_namespaces, spec.agent,
        )  # fmt: skip
        if self.waiting.generation != generation:  # an approval arrived meanwhile
            self.waiting.poke(uid)
        return None

    def _await(
        self,
        task: Mapping[str, Any],
        spec: TaskSpec,
        decision: Granted,
        outcome: Outcome,
        since: datetime | None = None,
    ) -> None:
        """Pending/AwaitingApproval, written only when it says something new."""
        current = task.get("status") or {}
        requester = spec.requester.to_dict() if spec.requester else None
        first = current.get("reason") != Reason.AWAITING_APPROVAL.value
        if (
            not first
            and current.get("phase") == Phase.PENDING.value
            and current.get("message") == outcome.message
            and current.get("approvals") == outcome.approvals
            and current.get("policies") == decision.policy_keys
            and current.get("stage") == spec.stage
        ):
            return
        now = self.clock()
        self._first_seen.pop(task["metadata"]["uid"], None)  # waiting is no grant latency
        staged = self.registry.get(task["metadata"]["uid"])  # a staged task between stages
        if first:
            self.audit.write(
                audit.record(
                    "pending",
                    task,
                    reason=Reason.AWAITING_APPROVAL,
                    phase=Phase.PENDING,
                    message=outcome.message,
                    detail=outcome.detail or None,
                    requested=_requested(spec),
                    requester=requester,
                    policies=[{"name": p.key, "kind": p.kind} for p in decision.policies],
                    approvals=outcome.approvals,
                    now=now,
                )
            )
        status = st.pending(
            task,
            Reason.AWAITING_APPROVAL,
            outcome.message,
            now,
            requester,
            decision.policy_keys,
            outcome.approvals,
        )
        if staged is not None and staged.stage_index >= 0:
            status["stage"] = staged.spec.stage
            status["stages"] = [dict(e) for e in staged.stages]
        elif spec.staged:  # waiting for its first stage (no identity yet): since when
            status["stage"] = spec.stage
            status["stages"] = [
                {"name": spec.stage, "phase": Phase.PENDING.value,
                 "reason": Reason.AWAITING_APPROVAL.value, "startedAt": precise(since)}
            ]  # fmt: skip
        uid = task["metadata"]["uid"]
        if staged is None:  # no identity: only this task's own queue writes its status
            if uid in self.ended:
                return
            self._write_status(task, status)
        else:
            with self.registry.lock(uid):  # a revocation racing this writes its end after
                if uid in self.ended or self.registry.get(uid) is None:
                    return
                self._write_status(task, status)
        if first:
            self._event(
                task, "Normal", Reason.AWAITING_APPROVAL, outcome.message, "AwaitApproval", spec
            )

    def _record_votes(self, task: Mapping[str, Any], spec: TaskSpec, outcome: Outcome) -> None:
        """An audit line and an Event for each decision not yet in the task's status (a
        restart repeats none that were recorded)."""
        known = {
            a.get("name")
            for a in (task.get("status") or {}).get("approvals") or ()
            if isinstance(a, Mapping)
        }
        requester = spec.requester.to_dict() if spec.requester else None
        names = {str(a.get("name")) for a in outcome.every} - known
        new = self.waiting.announce(task["metadata"]["uid"], names)
        for entry in outcome.every:
            if entry.get("name") not in new:
                continue
            who = (entry.get("approver") or {}).get("username") or "unknown"
            decision = entry.get("decision") or "no decision"
            if entry.get("counted"):
                verb = "approved" if decision == APPROVE else "denied"
                message = f"{verb} by {who}"
                if entry.get("comment"):
                    message += f": {entry['comment']}"
                kind, reason = "Normal", "Approved" if decision == APPROVE else "ApprovalDenied"
            else:
                message = f"{decision} by {who} not counted: {entry.get('reason')}"
                kind, reason = "Warning", "ApprovalNotCounted"
            self.audit.write(
                audit.record(
                    "approval",
                    task,
                    reason=reason,
                    phase=Phase.PENDING,
                    message=message,
                    requested=_requested(spec),
                    requester=requester,
                    approval=entry,
                    now=self.clock(),
                )
            )
            self._event(task, kind, reason, message, "Approve", spec)
