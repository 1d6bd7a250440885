"""Grant service: gathers facts, asks the engine, issues and revokes.

The AgentTask watch (tasks.py) calls into this module; it calls the adapter (`kube`, through
`facts` and `owned`) and the pure core (`engine`, `objects`, `status`). It owns
the all-or-nothing issuance and the revocation order: bindings first (403 at
once), then the identity (ServiceAccount, token Secret: 401), then the Roles.

What it acts on is what it owns: the task's spec and UID, its own objects and
its in-memory registry. A task's status is output only: a status written by
anyone else neither ends a live grant (it is restored) nor revives an ended one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from . import audit, stages
from . import status as st
from .approvals import Waiting
from .engine import (
    Denied,
    PodFacts,
    Policy,
    SpecError,
    TaskSpec,
    check_guardrails,
    condition_context,
    parse_task,
    reassess,
)
from .explain import Explainer
from .facts import SUSPENDED, AgentFacts, Cache, Facts
from .faults import checkpoint
from .informers import Key
from .issuance import _requested, _requester, _stub
from .kube import AGENT_TASKS, SERVICE_ACCOUNTS, Kube, KubeError, NotFound
from .limits import Limits
from .metrics import Metrics
from .model import (
    ANNOTATION_EXPIRES_AT,
    Phase,
    Reason,
)
from .owned import Owned
from .policy_status import PolicyStatus
from .rules import DEFAULT_GUARDRAILS, Guardrails
from .runtime import (
    Deadlines,
    LiveGrant,
    ObjectRef,
    Registry,
    planned_grant,
)
from .staging import Staging, stage_moved

log = logging.getLogger(__name__)

TERMINAL = {p.value for p in Phase if p.terminal}
RETRY_DELAY = timedelta(milliseconds=500)
#: Live grants under policies with conditions are re-evaluated at least this often (the
#: contract says 60 s): conditions on `now` change without any event.
CONDITIONS_PERIOD = 30.0
#: A grant's revocation starts this long before its expiresAt, so that its bindings
#: are gone (403) by then rather than a RoleBinding DELETE round trip after.
EXPIRY_LEAD = timedelta(milliseconds=5)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def pod_end_reason(pod: PodFacts | None, expected_uid: str | None) -> Reason | None:
    """Why a pod ends its grant (deleted, replaced, finished), or None while it runs."""
    if pod is None or pod.deleting or (expected_uid and pod.uid != expected_uid):
        return Reason.POD_DELETED
    if pod.phase == "Succeeded":
        return Reason.POD_SUCCEEDED
    if pod.phase == "Failed":
        return Reason.POD_FAILED
    return None


class Service(Staging):
    def __init__(
        self,
        kube: Kube,
        audit_log: audit.AuditLog,
        metrics: Metrics,
        guardrails: Guardrails = DEFAULT_GUARDRAILS,
        clock: Callable[[], datetime] = _utcnow,
        workers: int = 16,
    ):
        self.kube = kube
        self.audit = audit_log
        self.metrics = metrics
        self.guardrails = guardrails
        self.clock = clock
        self.registry = Registry()
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="grant-worker")
        #: The concurrent writes of one issuance, and reads when the watches are down
        #: (never waits on `pool` or `decisions`).
        self.io = ThreadPoolExecutor(max(8, 2 * workers), thread_name_prefix="io")
        #: Decisions (possibly costly) run apart from revocations, so a burst of large
        #: requests never delays a cancel, a deletion or a pod's end.
        self.decisions = ThreadPoolExecutor(max(4, workers), thread_name_prefix="decide")
        #: The rest of a mass revocation once its bindings are gone (403 everywhere):
        #: identities, Roles, statuses, Events, at low concurrency, so new tasks, cancels
        #: and other triggers keep most of the interpreter meanwhile.
        self.cleanup = ThreadPoolExecutor(max(2, workers // 4), thread_name_prefix="cleanup")
        self.cpu = ThreadPoolExecutor(1, thread_name_prefix="evaluate")
        #: Re-evaluations after policy and namespace changes, coalesced (see _dirty).
        self.triggers = ThreadPoolExecutor(1, thread_name_prefix="reevaluate")
        self._dirty: set[str] = set()
        self._dirty_all = False
        self._dirty_queued = False
        self._dirty_lock = threading.Lock()
        self.cache = Cache(kube)
        self.cache.on_policy = self._policy_event
        self.cache.on_namespace = self._namespace_event
        self.cache.on_service_account = self._service_account_event
        self.cache.on_pod = self._pod_event
        #: Tasks waiting for approval (approvals.py); their AgentTaskApprovals are watched.
        self.waiting = Waiting()
        self.limits = Limits(self.registry)
        self.explainer = Explainer(kube)
        self.policy_status = PolicyStatus(kube, clock)
        self.cache.on_approval = self.waiting.on_vote
        self.facts = Facts(kube, self.io, self.cache)
        self.owned = Owned(kube)
        self.deadlines = Deadlines(self._fire)
        self._retry: dict[str, tuple[Any, ...]] = {}
        #: When the operator first received each not-yet-decided task (grant latency).
        self._first_seen: dict[str, datetime] = {}
        #: Tasks decided for good in this process: no status write can revive them.
        self.ended: set[str] = set()
        #: Grants adopted at start-up, re-checked against the cluster when resumed.
        self.unverified: set[str] = set()
        #: Grants a re-evaluation is revoking (not re-evaluated again meanwhile).
        self._ending: set[str] = set()
        #: Grants whose RoleBindings a mass re-evaluation already deleted.
        self._bindings_dropped: dict[str, set[ObjectRef]] = {}
        #: Grants whose re-check failed on an API error: retried by the timer.
        self._pending_recheck: set[str] = set()
        #: End-of-grant statuses that could not be written yet: retried by the timer.
        self._pending_status: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
        self._stopped = threading.Event()
        metrics.bind_registry(self.registry, self.clock)

    def _fire(self, uid: str) -> None:
        self.pool.submit(self.on_deadline, uid)

    def close(self, timeout: float = 0.0) -> bool:
        """Stop: no new work starts, queued work is dropped (a restart, or the next
        leader, rebuilds everything from the cluster), and work already running gets
        up to `timeout` seconds to finish. True if nothing runs any more."""
        self._stopped.set()
        self.cache.stop()
        self.deadlines.stop()
        self.waiting.stop()
        self.policy_status.stop()
        pools = [self.triggers, self.pool, self.decisions, self.cleanup, self.cpu, self.io]
        for pool in pools:
            pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + timeout
        threads = [t for pool in pools for t in list(getattr(pool, "_threads", ()))]
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in threads)

    # -- the main reconcile ------------------------------------------------------------

    def note_seen(self, task: Mapping[str, Any]) -> None:
        """Every watch event of a task (no I/O): notes when an undecided task was first
        received (its creationTimestamp has whole-second precision, too coarse for
        latency)."""
        if not (task.get("status") or {}).get("phase"):
            self._first_seen.setdefault(task["metadata"]["uid"], self.clock())

    def status_forged(self, task: Mapping[str, Any]) -> bool:
        """A live grant's task whose status says it ended: terminal is written only after
        the registry let go, so someone else wrote it (no I/O)."""
        phase = (task.get("status") or {}).get("phase")
        return (
            phase in TERMINAL
            and not task["metadata"].get("deletionTimestamp")
            and self.registry.get(task["metadata"]["uid"]) is not None
        )

    def restore_forged_status(self, task: Mapping[str, Any]) -> None:
        """Put back the status of a live grant that someone else marked as ended (under
        the grant's lock: a revocation racing it writes its end after, not before)."""
        if self.status_forged(task):
            uid = task["metadata"]["uid"]
            with self.registry.lock(uid):
                grant = self.registry.get(uid)
                if grant is not None:
                    self._restore_status(task, grant)

    def forget(self, uid: str) -> None:
        """The task is gone for good: drop what was kept about it."""
        self._first_seen.pop(uid, None)
        self.waiting.done(uid)

    def needs_decision(self, task: Mapping[str, Any]) -> bool:
        """Would reconcile decide (evaluate and issue) this task? In memory, no I/O."""
        meta = task["metadata"]
        phase = (task.get("status") or {}).get("phase")
        return not (
            meta.get("deletionTimestamp")
            or self.registry.get(meta["uid"]) is not None
            or meta["uid"] in self.ended
            or phase in TERMINAL
            or phase == Phase.ACTIVE.value
        )

    def has_work(self, task: Mapping[str, Any]) -> bool:
        """Would reconcile do anything for this task? In memory, no I/O: most events of
        a live or ended task (its own status writes) need nothing, and must not queue
        behind revocations for a thread."""
        meta = task["metadata"]
        uid = meta["uid"]
        if meta.get("deletionTimestamp"):
            return False  # the delete handler revokes
        grant = self.registry.get(uid)
        if grant is not None:
            return (
                (task.get("spec") or {}).get("cancel") is True
                or uid in self.unverified
                or stage_moved(task, grant)
            )
        return uid not in self.ended

    def reconcile(self, task: Mapping[str, Any]) -> None:
        """Create, resume or update of an AgentTask: bring it to a correct phase.

        Whether a grant is live is the registry's word (rebuilt from the operator's own
        objects at start-up), never the status's.
        """
        meta = task["metadata"]
        uid = meta["uid"]
        if meta.get("deletionTimestamp"):
            return  # the delete handler revokes
        grant = self.registry.get(uid)
        if grant is not None:
            if (task.get("spec") or {}).get("cancel") is True:
                if grant.stage_index >= 0 and grant.spec.last_stage and grant.stage_live:
                    message = f"the last stage ({grant.spec.stage}) was left by spec.cancel"
                    self.revoke(grant, Reason.STAGES_DONE, message, meta.get("generation"))
                else:
                    self.revoke(
                        grant, Reason.CANCELLED, "cancelled by spec.cancel", meta.get("generation")
                    )
            elif stage_moved(task, grant):
                self.unverified.discard(uid)  # a fresh decision: more than a re-check
                self.stage_work(task, grant)
            elif uid in self.unverified:
                self.unverified.discard(uid)
                self._recheck_soon(uid)  # retried by the timer if the API fails
            return
        if uid in self.ended:
            return
        phase = (task.get("status") or {}).get("phase")
        if phase in TERMINAL or phase == Phase.ACTIVE.value:
            # Terminal: nothing to do. "Active" without a live grant here (start-up
            # adopted every task whose status said so): written by someone else.
            self.ended.add(uid)
            return
        self.issue(task)

    def _restore_status(self, task: Mapping[str, Any], grant: LiveGrant) -> None:
        """Someone else rewrote the status of a live grant: put the truth back."""
        log.warning("status of %s was changed outside the operator; restoring it", grant.ref)
        self._write_status(task, self._active_status(task, grant))
        self._event(
            task,
            "Warning",
            "StatusRestored",
            "the status was changed outside the operator; the grant is still live",
            "Restore",
        )

    def recheck(self, grant: LiveGrant) -> None:
        """Verify a live grant against the cluster now; revoke it if it must end."""
        now = self.clock()
        if grant.expires_at is None or grant.expires_at <= now:
            self.revoke(grant, Reason.TTL_EXPIRED, "the TTL ran out")
            return
        spec = grant.spec
        if not grant.stage_live:
            return  # a staged task between stages: no access to re-check (TTL checked above)
        forbidden = check_guardrails(spec, self.guardrails)
        if forbidden:
            self.revoke(
                grant,
                Reason.POLICY_CHANGED,
                f"the installation's guardrails no longer allow it: {forbidden.message}",
            )
            return
        if not self.facts.agent_exists(spec.namespace, spec.agent):
            self.revoke(grant, Reason.AGENT_NOT_FOUND, f"agent ServiceAccount {spec.agent} deleted")
            return
        why = self.facts.suspension(spec.namespace, spec.agent)
        if why:
            self.revoke(grant, Reason.AGENT_SUSPENDED, why)
            return
        if spec.pod_name:
            pod = self.facts.pod(spec.namespace, spec.pod_name, grant.pod_uid)
            reason = pod_end_reason(pod, grant.pod_uid)
            if reason:
                self.revoke(grant, reason, self._pod_message(spec.pod_name, reason))
                return
        targets = [g.namespace for g in grant.grants]
        policies, namespaces = self.facts.policies(targets), self.facts.namespaces(targets)
        verdict = reassess(
            spec, policies, namespaces, grant.policies, self._context(spec, policies, now)
        )
        if isinstance(verdict, Denied):
            self.revoke(grant, verdict.reason, verdict.message, detail=verdict.detail)
        else:  # a maxTTL lowered meanwhile (e.g. while the operator was down)
            self._clamp(grant, verdict)

    def _context(
        self, spec: TaskSpec, policies: list[Policy], now: datetime
    ) -> dict[str, Any] | None:
        """What a re-check's conditions read (None, and nothing read, without any)."""
        if not any(p.conditions for p in policies):
            return None
        agent, pod = self.facts.condition_objects(spec)
        return condition_context(spec, policies, agent, pod, now)

    @staticmethod
    def _ttl_message(grant: LiveGrant) -> str:
        if grant.stage_index < 0:
            return "the TTL ran out"
        if grant.task_expires_at and grant.expires_at and grant.task_expires_at <= grant.expires_at:
            return f"the task's TTL ran out (in stage {grant.spec.stage})"
        return f"the TTL of stage {grant.spec.stage} ran out"

    @staticmethod
    def _pod_message(pod: str, reason: Reason) -> str:
        return {
            Reason.POD_DELETED: f"pod {pod} was deleted",
            Reason.POD_SUCCEEDED: f"pod {pod} succeeded",
            Reason.POD_FAILED: f"pod {pod} failed",
        }[reason]

    def _recheck_soon(self, uid: str) -> None:
        """Re-check a live grant now; if the API fails, again shortly (never lost)."""
        live = self.registry.get(uid)
        if live is None:
            return
        try:
            self.recheck(live)
        except KubeError as exc:
            log.warning("re-checking %s failed (%s); again shortly", live.ref, exc)
            self._pending_recheck.add(uid)
            self.deadlines.schedule(uid, self.clock() + RETRY_DELAY)

    # -- revocation --------------------------------------------------------------------------

    def delete_objects(self, grant: LiveGrant) -> datetime:
        """Bindings first (requests fail with 403 at once), then the identity, then Roles.

        Only the task's own objects are deleted (see `owned`). Returns when the
        bindings were gone.
        """
        dropped = self._bindings_dropped.pop(grant.uid, set())  # by a mass re-evaluation
        self.owned.delete_grant_part(
            grant, [b for b in grant.leftover_bindings() + grant.bindings() if b not in dropped]
        )
        bindings_gone = self.clock()
        checkpoint("revoke:rolebindings")
        reader, sa, secret = grant.identity()
        self.owned.delete_grant_part(grant, [reader, sa])
        checkpoint("revoke:serviceaccount")
        self.owned.delete_grant_part(grant, [secret])
        checkpoint("revoke:secret")
        self.owned.delete_grant_part(grant, grant.leftover_roles() + grant.roles())
        checkpoint("revoke:roles")
        return bindings_gone

    def revoke(
        self,
        grant: LiveGrant,
        reason: Reason,
        message: str,
        generation: int | None = None,
        write_status: bool = True,
        triggered_at: datetime | None = None,
        detail: str = "",
        phase: Phase | None = None,
    ) -> bool:
        """End a live grant once, whatever raced to end it. True if this call ended it.
        `phase`: when not the one the reason implies (a staged task whose next stage is
        denied ends Denied, with the stage's reason)."""
        triggered_at = triggered_at or self.clock()
        phase = phase or st.END_PHASE[reason]
        with self.registry.lock(grant.uid):
            current = self.registry.get(grant.uid)
            if current is None:
                return False
            grant = current  # as it is now (a staged task may have moved on meanwhile)
            try:
                bindings_gone = self.delete_objects(grant)
            except KubeError as exc:
                log.error("revoking %s failed, retrying: %s", grant.ref, exc)  # every 0.5 s
                self._retry[grant.uid] = (reason, message, None, True, None, detail, phase)
                self.deadlines.schedule(grant.uid, self.clock() + RETRY_DELAY)
                return False
            self.ended.add(grant.uid)
            self.registry.remove(grant.uid)
            self.unverified.discard(grant.uid)
            self._pending_recheck.discard(grant.uid)
            self.deadlines.cancel(grant.uid)
            self._retry.pop(grant.uid, None)
        now = self.clock()
        self.metrics.revoked(reason, (bindings_gone - triggered_at).total_seconds())
        stub = _stub(grant, generation)
        event = "expired" if reason == Reason.TTL_EXPIRED else "revoked"
        self.audit.write(
            audit.record(
                "denied" if phase == Phase.DENIED else event,
                stub,
                reason=reason,
                phase=phase,
                message=message,
                detail=detail or None,
                requested=_requested(grant.spec),
                requester=_requester(grant.spec),
                granted=[g.to_status() for g in grant.grants],
                policies=[{"name": p} for p in grant.policies],
                objects=self._object_list(grant),
                granted_at=st.rfc3339(grant.granted_at) if grant.granted_at else None,
                expires_at=st.rfc3339(grant.expires_at) if grant.expires_at else None,
                ended_at=st.rfc3339(now),
                trigger=reason,
                now=now,
                stage=grant.spec.stage,
            )
        )
        if write_status:
            status = st.ended_as(stub, phase, reason, message, now)
            if grant.stage_index >= 0:
                status["stage"] = grant.spec.stage
                status["stages"] = [
                    dict(e) for e in stages.end(grant.stages, grant.spec.stage, phase, reason, now)
                ]
            self._record_end(stub, status)
            checkpoint("revoke:status")
        self._event(stub, "Normal", reason, message, "Revoke", grant.spec)
        self.registry.forget_lock(grant.uid)
        return True

    def _record_end(self, stub: dict[str, Any], status: dict[str, Any]) -> None:
        """Write an ended grant's status; on an API error, again shortly."""
        uid = stub["metadata"]["uid"]
        try:
            self._write_status(stub, status, exists=True)
        except NotFound:
            pass
        except KubeError as exc:
            log.warning("could not record the end of %s (%s); again shortly", uid, exc)
            self._pending_status[uid] = (stub, status)
            self.deadlines.schedule(uid, self.clock() + RETRY_DELAY)

    # -- triggers ------------------------------------------------------------------------------

    def schedule_expiry(self, uid: str, expires_at: datetime) -> None:
        self.deadlines.schedule(uid, expires_at - EXPIRY_LEAD)

    def on_deadline(self, uid: str) -> None:
        grant = self.registry.get(uid)
        if grant is None:
            pending = self._pending_status.pop(uid, None)
            if pending:  # later on: only if the name still holds this very task
                meta = pending[0]["metadata"]
                try:
                    current = self.kube.get(AGENT_TASKS, meta["namespace"], meta["name"])
                except KubeError:
                    current = {"metadata": {"uid": uid}}  # try the write; it retries
                if current and current["metadata"].get("uid") == uid:
                    self._record_end(*pending)
            return
        retry = self._retry.get(uid)
        if retry:
            self.revoke(grant, *retry)
        elif grant.expires_at and grant.expires_at <= self.clock() + timedelta(milliseconds=50):
            if grant.stage_index >= 0 and grant.spec.last_stage and grant.stage_live:
                message = f"the last stage ({grant.spec.stage}) ended: all stages done"
                self.revoke(grant, Reason.STAGES_DONE, message, triggered_at=grant.expires_at)
            else:
                self.revoke(
                    grant,
                    Reason.TTL_EXPIRED,
                    self._ttl_message(grant),
                    triggered_at=grant.expires_at,
                )
        elif uid in self._pending_recheck:
            self._pending_recheck.discard(uid)
            self.schedule_expiry(uid, grant.expires_at or self.clock())
            self._recheck_soon(uid)
        elif grant.expires_at:
            self.schedule_expiry(uid, grant.expires_at)

    # Watch events (informer threads): filter cheaply, hand real work to the pools.

    def _pod_event(self, kind: str, key: Key, old: PodFacts | None, new: PodFacts | None) -> None:
        ns, name = key
        if new is not None and not new.deleting and new.phase not in ("Succeeded", "Failed"):
            if old is not None and old.labels != new.labels and self.registry.has_pod(ns, name):
                self._reevaluate_soon(self.registry.for_pod(ns, name))  # conditions read them
            return  # running or pending: ends nothing (the common case in a busy cluster)
        if old is not None and old == new:
            return
        self.registry.bump()  # a grant being issued for this pod right now re-checks
        if self.registry.has_pod(ns, name):
            self.pool.submit(self.on_pod, ns, name, new)

    def _service_account_event(
        self, kind: str, key: Key, old: AgentFacts | None, new: AgentFacts | None
    ) -> None:
        ns, name = key
        if new is not None and new.suspended and not (old is not None and old.suspended):
            self.waiting.wake_agent(ns, name)  # a waiting task of the agent is denied now
            self.registry.bump()  # a grant being issued right now re-checks too
            if self.registry.has_agent(ns, name):
                self.pool.submit(self.on_agent_suspended, ns, name, f"agent ServiceAccount "
                                 f"{ns}/{name} is suspended (annotation {SUSPENDED})")  # fmt: skip
        if new is not None and (old is None or old.uid == new.uid):
            if (
                old is not None
                and (old.labels, old.annotations) != (new.labels, new.annotations)
                and self.registry.has_agent(ns, name)
            ):
                self._reevaluate_soon(self.registry.for_agent(ns, name))  # conditions read them
            return  # created, or changed but the same object
        # deleted, or deleted and created again while the watch was down
        self.registry.bump()
        if self.registry.has_agent(ns, name):
            self.pool.submit(self.on_service_account_deleted, ns, name)

    def _policy_event(self, kind: str, key: Key, old: object, new: object) -> None:
        self.policy_status.observe(new if isinstance(new, Policy) else None)
        if old != new:
            self._reevaluate_later(key[0] or None)
            # tasks waiting for approval are decided again: those it may concern
            if key[0]:
                self.waiting.wake_namespace(key[0])
            else:
                self.waiting.wake_all()

    def _namespace_event(self, kind: str, key: Key, old: Any, new: Any) -> None:
        was = old is not None and old.get(SUSPENDED) == "true"
        if new is not None and new.get(SUSPENDED) == "true" and not was:
            self.registry.bump()
            self.pool.submit(
                self.on_agent_suspended, key[1], None,
                f"namespace {key[1]} is suspended (label {SUSPENDED})",
            )  # fmt: skip
        if old is not None and old != new:  # relabelled, being deleted, or gone
            self._reevaluate_later(key[1])
            self.waiting.wake_namespace(key[1])

    def _reevaluate_later(self, namespace: str | None) -> None:
        """Re-evaluate the grants into `namespace` (all grants: None) soon. Changes that
        arrive while a re-evaluation runs are coalesced into the next one: a burst of
        policy edits costs a few passes, not one per edit."""
        self.registry.bump()  # a grant being issued right now re-checks too
        with self._dirty_lock:
            if namespace is None:
                self._dirty_all = True
            else:
                self._dirty.add(namespace)
            if self._dirty_queued:
                return
            self._dirty_queued = True
        self.triggers.submit(self._reevaluate_dirty)

    def _reevaluate_soon(self, grants: list[LiveGrant]) -> None:
        """Re-evaluate these grants (their conditions read something that changed)."""
        self.registry.bump()
        if grants:
            with contextlib.suppress(RuntimeError):  # shutting down
                self.triggers.submit(self._reevaluate, grants)

    def recheck_conditions(self) -> None:
        """Every live grant that relies on a policy with conditions is re-evaluated (time
        windows move on without any event). Called every CONDITIONS_PERIOD."""
        keys = {p.key for p in self.facts.policies(None) if p.conditions}
        if keys:
            self._reevaluate_soon([g for g in self.registry.all() if keys & set(g.policies)])

    def _wake_when_listed(self) -> None:
        while not self._stopped.is_set():
            if self.cache.approvals.synced.wait(1.0):
                self.waiting.wake_all()
                return

    def _every_period(self) -> None:
        period = float(os.environ.get("AAO_CONDITIONS_PERIOD") or CONDITIONS_PERIOD)  # tests
        while not self._stopped.wait(period):
            try:
                self.recheck_conditions()
            except Exception:  # an API error: next period
                log.exception("re-checking conditions failed")

    def _reevaluate_dirty(self) -> None:
        with self._dirty_lock:
            everything, names = self._dirty_all, self._dirty
            self._dirty_all, self._dirty, self._dirty_queued = False, set(), False
        affected = self.registry.for_target(None if everything else names)
        if affected:
            self._reevaluate(affected)

    def on_pod(self, namespace: str, name: str, pod: PodFacts | None) -> None:
        """A pod finished, is being deleted or is gone (None)."""
        for grant in self.registry.for_pod(namespace, name):
            if pod is not None and grant.pod_uid and grant.pod_uid != pod.uid:
                continue  # an event about another pod of the same name
            reason = pod_end_reason(pod, grant.pod_uid)
            if reason:
                self.revoke(grant, reason, self._pod_message(name, reason))

    def on_agent_suspended(self, namespace: str, agent: str | None, why: str) -> None:
        """Every live grant of the agent (every agent of the namespace: None) ends."""
        if agent is not None:
            grants = self.registry.for_agent(namespace, agent)
        else:
            grants = [g for g in self.registry.all() if g.namespace == namespace]
        self._end_all(grants, Denied(Reason.AGENT_SUSPENDED, why))

    def on_service_account_deleted(self, namespace: str, name: str) -> None:
        for grant in self.registry.for_agent(namespace, name):
            self.revoke(
                grant, Reason.AGENT_NOT_FOUND, f"agent ServiceAccount {namespace}/{name} deleted"
            )

    def _reevaluate(self, grants: list[LiveGrant]) -> None:
        """Re-evaluate after an outside change; if the API fails, each grant is re-checked
        on its own shortly (a watch event is not delivered twice)."""
        try:
            self._reevaluate_now(grants)
        except KubeError as exc:
            log.warning("re-evaluating %d grants failed (%s); again shortly", len(grants), exc)
            for grant in grants:
                self._pending_recheck.add(grant.uid)
                self.deadlines.schedule(grant.uid, self.clock() + RETRY_DELAY)

    def _reevaluate_now(self, grants: list[LiveGrant]) -> None:
        targets = sorted({g.namespace for grant in grants for g in grant.grants})
        few = targets if len(targets) <= 3 or self.facts.cache_ready() else None
        policies, namespaces = self.facts.policies(few), self.facts.namespaces(few)
        triggered = self.clock()
        ending: list[tuple[LiveGrant, Denied, Future[None]]] = []
        # Cheapest first, and each grant that must end loses its bindings (403) as soon
        # as that is known, before any other revocation work is queued: a few costly
        # requests cannot hold up everyone's revocation.
        for grant in sorted(grants, key=lambda g: g.spec.atom_count):
            if grant.uid in self._ending:
                continue  # already on its way out (an earlier pass)
            if not grant.stage_live:
                continue  # a staged task between stages: its next stage is decided afresh
            try:
                context = self._context(grant.spec, policies, triggered)
                verdict = reassess(grant.spec, policies, namespaces, grant.policies, context)
            except Exception:  # one grant's trouble never spares the others
                log.exception("re-evaluating %s failed; revoking it", grant.ref)
                verdict = Denied(Reason.POLICY_CHANGED, "policies changed; could not re-evaluate")
            if isinstance(verdict, Denied):
                ending.append((grant, verdict, self.pool.submit(self._drop_bindings, grant)))
            else:
                self._clamp(grant, verdict)
        self._finish_all(ending, triggered)

    def _end_all(self, grants: list[LiveGrant], denied: Denied) -> None:
        """Many grants end for one reason (a suspension): every binding first, at once,
        then the rest, as a policy change does."""
        triggered = self.clock()
        ending = [
            (g, denied, self.pool.submit(self._drop_bindings, g))
            for g in grants
            if g.uid not in self._ending
        ]
        self._finish_all(ending, triggered)

    def _finish_all(
        self, ending: list[tuple[LiveGrant, Denied, Future[None]]], triggered: datetime
    ) -> None:
        # Not waited for: the next change is handled while these finish.
        # The rest starts once every binding of this pass is gone: nothing competes with
        # the 403s, and the cleanup then runs at low concurrency.
        drops = [dropped for _, _, dropped in ending]
        for g, d, _ in ending:
            self._ending.add(g.uid)
            self.cleanup.submit(self._finish_revocation, g, d, triggered, drops)

    def _finish_revocation(
        self, grant: LiveGrant, denied: Denied, triggered: datetime, drops: list[Future[None]]
    ) -> None:
        try:
            wait(drops)  # _drop_bindings never raises: failures are logged, redone below
            self.revoke(grant, denied.reason, denied.message, None, True, triggered, denied.detail)
        except Exception:  # revoke retries API errors itself; anything else is a bug
            log.exception("revoking %s failed", grant.ref)
        finally:
            self._ending.discard(grant.uid)

    def _drop_bindings(self, grant: LiveGrant) -> None:
        """The first step of a revocation, ahead of the rest (its revoke skips them)."""
        with self.registry.lock(grant.uid):  # not while a staged task changes stage
            live = self.registry.get(grant.uid)
            if live is None:
                return
            bindings = live.leftover_bindings() + live.bindings()
            try:
                self.owned.delete_grant_part(live, bindings)
            except KubeError as exc:  # the revocation itself tries again
                log.warning("deleting the bindings of %s failed: %s", grant.ref, exc)
                return
            self._bindings_dropped[grant.uid] = set(bindings)

    def _clamp(self, grant: LiveGrant, ttl: timedelta) -> None:
        """A policy now allows a shorter grant (its maxTTL went down): end earlier."""
        if grant.granted_at is None or grant.expires_at is None:
            return
        deadline = grant.granted_at + ttl
        if deadline >= grant.expires_at:
            return
        with self.registry.lock(grant.uid):
            live = self.registry.get(grant.uid)
            if live is None:
                return
            self.registry.add(replace(live, expires_at=deadline))
            self.schedule_expiry(grant.uid, deadline)
        until = st.rfc3339(deadline)
        message = f"policies changed: the grant now ends at {until} (maxTTL lowered)"
        log.info("%s: %s", grant.ref, message)
        # The records a restart reads (it takes the earlier of the two): status, then
        # the identity's annotation; either one alone keeps the shorter deadline.
        for record in (
            lambda: self._write_status(_stub(grant), {"expiresAt": until}, partial=True),
            lambda: self.kube.merge_patch(
                SERVICE_ACCOUNTS,
                grant.namespace,
                grant.service_account,
                {"metadata": {"annotations": {ANNOTATION_EXPIRES_AT: until}}},
            ),
        ):
            try:
                record()
            except KubeError as exc:
                log.warning("could not record the earlier end of %s: %s", grant.ref, exc)
        self._event(_stub(grant), "Normal", Reason.POLICY_CHANGED, message, "Shorten", grant.spec)

    def on_task_deleted(self, task: Mapping[str, Any]) -> None:
        meta = task["metadata"]
        uid = meta["uid"]
        phase = (task.get("status") or {}).get("phase")
        grant = self.registry.get(uid)
        self._first_seen.pop(uid, None)
        self.waiting.done(uid)
        message = "the AgentTask was deleted"
        if grant is not None:
            self.revoke(grant, Reason.TASK_DELETED, message, write_status=False)
        else:
            # Not live here: remove whatever an interrupted issuance may have left
            # (only objects that prove to be this task's).
            try:
                spec = parse_task(task)
            except SpecError:
                spec = None
            if spec is not None:
                self.delete_objects(planned_grant(task, spec))
            self._event(task, "Normal", Reason.TASK_DELETED, message, "Delete", spec)
            self.audit.write(
                audit.record(
                    "deleted",
                    task,
                    reason=Reason.TASK_DELETED,
                    phase=phase if phase in TERMINAL else Phase.PENDING,
                    message=message,
                    requested=_requested(spec) if spec else [],
                    requester=_requester(spec),
                    ended_at=st.rfc3339(self.clock()),
                )
            )
        self.ended.add(uid)  # being deleted: never decided again (DELETED forgets it)

    def on_task_gone(self, task: Mapping[str, Any]) -> None:
        """The task vanished without passing the finalizer (an admin removed it):
        a live grant still ends."""
        grant = self.registry.get(task["metadata"]["uid"])
        if grant is not None:
            self.on_task_deleted(task)
        self.ended.discard(task["metadata"]["uid"])

    # -- start-up ------------------------------------------------------------------------------

    def start(self, sync_timeout: float = 60) -> None:
        from .recovery import recover

        if not self.cache.start(sync_timeout):  # facts are read from the API meanwhile
            log.warning("watches not listed after %ss; reading facts directly", sync_timeout)
            # approvals made before the approvals watch lists wake nobody: once it has,
            # every waiting task looks again
            threading.Thread(target=self._wake_when_listed, daemon=True).start()
        self.policy_status.observe_all(
            [*self.cache.policies.values(), *self.cache.cluster_policies.values()]
        )
        threading.Thread(target=self._every_period, name="conditions", daemon=True).start()
        recover(self)
