"""Grant service: gathers facts, asks the engine, issues and revokes.

The AgentTask watch (tasks.py) calls into this module; it calls the adapter (`kube`, through
`facts` and `owned`) and the pure core (`engine`, `objects`, `status`). It owns
the all-or-nothing issuance and the revocation order: bindings first (403 at
once), then the identity (ServiceAccount, token Secret: 401), then the Roles.

Split by concern: deciding and issuing (issuance.py), waiting for approval
(approvals.py), moving between stages (staging.py), and outside changes that may end
grants (reevaluation.py) are mixins of this class; this module keeps the task's
reconcile, revocation, deadlines and start-up.

What it acts on is what it owns: the task's spec and UID, its own objects and
its in-memory registry. A task's status is output only: a status written by
anyone else neither ends a live grant (it is restored) nor revives an ended one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

from . import audit, stages
from . import status as st
from .approvals import Waiting
from .engine import (
    Denied,
    SpecError,
    check_guardrails,
    parse_task,
    reassess,
)
from .explain import Explainer
from .facts import Cache, Facts
from .faults import checkpoint, hold
from .idle import Idle
from .issuance import _requested, _requester, _stub
from .kube import AGENT_TASKS, Kube, KubeError, NotFound
from .limits import Limits
from .metrics import Metrics
from .model import (
    Phase,
    Reason,
)
from .owned import Owned
from .policy_status import PolicyStatus
from .reevaluation import RETRY_DELAY, pod_end_reason
from .rules import DEFAULT_GUARDRAILS, Guardrails
from .runtime import (
    Deadlines,
    LiveGrant,
    ObjectRef,
    Registry,
    planned_grant,
)
from .staging import stage_moved

log = logging.getLogger(__name__)

TERMINAL = {p.value for p in Phase if p.terminal}


#: A grant's revocation starts this long before its expiresAt, so that its bindings
#: are gone (403) by then rather than a RoleBinding DELETE round trip after.
EXPIRY_LEAD = timedelta(milliseconds=5)


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Service(Idle):
    def __init__(
        self,
        kube: Kube,
        audit_log: audit.AuditLog,
        metrics: Metrics,
        guardrails: Guardrails = DEFAULT_GUARDRAILS,
        clock: Callable[[], datetime] = _utcnow,
        workers: int = 16,
        cache: Cache | None = None,
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
        #: The watches behind the facts; shared with the enforcement point when it runs
        #: (it started them before this process led).
        self.cache = cache or Cache(kube)
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
        #: Token credential hashes of issuances under way (issuance.py).
        self._credentials: dict[str, str] = {}
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

    @staticmethod
    def _ttl_message(grant: LiveGrant) -> str:
        if grant.stage_index < 0:
            return "the TTL ran out"
        if grant.task_expires_at and grant.expires_at and grant.task_expires_at <= grant.expires_at:
            return f"the task's TTL ran out (in stage {grant.spec.stage})"
        return f"the TTL of stage {grant.spec.stage} ran out"

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
        hold("revoke:start")
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
        event = "expired" if reason in (Reason.TTL_EXPIRED, Reason.IDLE_TIMEOUT) else "revoked"
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
        """The grant's timer: at expiresAt, or at its idle deadline if that is earlier."""
        when = expires_at - EXPIRY_LEAD
        grant = self.registry.get(uid)
        due = self.idle_due(grant) if grant is not None else None
        self.deadlines.schedule(uid, min(when, due) if due is not None else when)

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
        elif self.end_if_idle(grant):
            pass
        elif uid in self._pending_recheck:
            self._pending_recheck.discard(uid)
            self.schedule_expiry(uid, grant.expires_at or self.clock())
            self._recheck_soon(uid)
        elif grant.expires_at:
            self.schedule_expiry(uid, grant.expires_at)

    # Watch events (informer threads): filter cheaply, hand real work to the pools.

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
