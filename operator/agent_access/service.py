"""Grant service: gathers facts, asks the engine, issues and revokes.

The kopf handlers call into this module; it calls the adapter (`kube`, through
`facts` and `owned`) and the pure core (`engine`, `objects`, `status`). It owns
the all-or-nothing issuance and the revocation order: bindings first (403 at
once), then the identity (ServiceAccount, token Secret: 401), then the Roles.

What it acts on is what it owns: the task's spec and UID, its own objects and
its in-memory registry. A task's status is output only: a status written by
anyone else neither ends a live grant (it is restored) nor revives an ended one.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from . import audit, objects
from . import status as st
from .engine import (
    Denied,
    Granted,
    PodFacts,
    SpecError,
    TaskSpec,
    World,
    check_guardrails,
    evaluate,
    parse_task,
    reevaluate,
)
from .facts import Facts, pod_facts
from .faults import checkpoint
from .kube import AGENT_TASKS, PODS, SECRETS, SERVICE_ACCOUNTS, Kube, KubeError, NotFound
from .metrics import Metrics
from .model import (
    ANNOTATION_EXPIRES_AT,
    ANNOTATION_GRANTED_AT,
    ANNOTATION_POD_UID,
    ANNOTATION_POLICIES,
    API_VERSION,
    Phase,
    Reason,
)
from .owned import Owned
from .rules import DEFAULT_GUARDRAILS, Guardrails
from .runtime import (
    ROLE,
    ROLE_BINDING,
    SECRET,
    SERVICE_ACCOUNT,
    Deadlines,
    LiveGrant,
    NamespaceGrant,
    ObjectRef,
    Registry,
    planned_grant,
)

log = logging.getLogger(__name__)

TERMINAL = {p.value for p in Phase if p.terminal}
RETRY_DELAY = timedelta(milliseconds=500)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _compact(status: Mapping[str, Any]) -> dict[str, Any]:
    """Drop unknown (None) values so a merge patch never deletes a field by accident."""
    out = {k: v for k, v in status.items() if v is not None}
    if "conditions" in out:
        out["conditions"] = [
            {k: v for k, v in c.items() if v is not None} for c in out["conditions"]
        ]
    return out


def _stub(grant: LiveGrant, generation: int | None = None) -> dict[str, Any]:
    """A minimal AgentTask body for events, status and audit of a known grant."""
    meta: dict[str, Any] = {"name": grant.name, "namespace": grant.namespace, "uid": grant.uid}
    if generation is not None:
        meta["generation"] = generation
    return {
        "apiVersion": API_VERSION,
        "kind": "AgentTask",
        "metadata": meta,
        "spec": {
            "agent": grant.spec.agent,
            "intent": grant.spec.intent,
            "podName": grant.spec.pod_name,
            "audiences": list(grant.spec.audiences),
        },
    }


def _requested(spec: TaskSpec) -> list[dict[str, Any]]:
    return [
        {"namespace": e.namespace, "rules": [r.to_dict() for r in e.rules]} for e in spec.access
    ]


def _requester(spec: TaskSpec | None) -> dict[str, Any] | None:
    return spec.requester.to_dict() if spec and spec.requester else None


def pod_end_reason(pod: PodFacts | None, expected_uid: str | None) -> Reason | None:
    """Why a pod ends its grant (deleted, replaced, finished), or None while it runs."""
    if pod is None or pod.deleting or (expected_uid and pod.uid != expected_uid):
        return Reason.POD_DELETED
    if pod.phase == "Succeeded":
        return Reason.POD_SUCCEEDED
    if pod.phase == "Failed":
        return Reason.POD_FAILED
    return None


class Service:
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
        #: For concurrent reads inside one decision (never waits on `pool`).
        self.io = ThreadPoolExecutor(max(8, workers), thread_name_prefix="io")
        self.facts = Facts(kube, self.io)
        self.owned = Owned(kube)
        self.deadlines = Deadlines(self._fire)
        self._retry: dict[str, tuple[Reason, str]] = {}
        #: When the operator first received each not-yet-decided task (grant latency).
        self._first_seen: dict[str, datetime] = {}
        #: Tasks decided for good in this process: no status write can revive them.
        self.ended: set[str] = set()
        #: Grants adopted at start-up, re-checked against the cluster when resumed.
        self.unverified: set[str] = set()
        #: Grants whose re-check failed on an API error: retried by the timer.
        self._pending_recheck: set[str] = set()
        #: End-of-grant statuses that could not be written yet: retried by the timer.
        self._pending_status: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
        metrics.bind_registry(self.registry, self.clock)

    def _fire(self, uid: str) -> None:
        self.pool.submit(self.on_deadline, uid)

    def close(self) -> None:
        self.deadlines.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.io.shutdown(wait=False, cancel_futures=True)

    # -- the main reconcile ------------------------------------------------------------

    def seen(self, task: Mapping[str, Any]) -> None:
        """Every watch event of a task. Notes when an undecided task was first received
        (its creationTimestamp has whole-second precision, too coarse for latency), and
        puts back the status of a live grant that someone else marked as ended (a
        status-only change starts no other handler)."""
        phase = (task.get("status") or {}).get("phase")
        uid = task["metadata"]["uid"]
        if not phase:
            self._first_seen.setdefault(uid, self.clock())
        elif phase in TERMINAL and not task["metadata"].get("deletionTimestamp"):
            # Terminal is written only after the registry let go: this one is forged.
            grant = self.registry.get(uid)
            if grant is not None:
                self._restore_status(task, grant)

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
                self.revoke(
                    grant, Reason.CANCELLED, "cancelled by spec.cancel", meta.get("generation")
                )
            elif uid in self.unverified:
                self.unverified.discard(uid)
                self.recheck(grant)
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
        forbidden = check_guardrails(spec, self.guardrails)
        if forbidden:
            self.revoke(
                grant,
                Reason.POLICY_CHANGED,
                f"the installation's guardrails no longer allow it: {forbidden.message}",
            )
            return
        if self.kube.get(SERVICE_ACCOUNTS, spec.namespace, spec.agent) is None:
            self.revoke(grant, Reason.AGENT_NOT_FOUND, f"agent ServiceAccount {spec.agent} deleted")
            return
        if spec.pod_name:
            pod = pod_facts(self.kube.get(PODS, spec.namespace, spec.pod_name))
            reason = pod_end_reason(pod, grant.pod_uid)
            if reason:
                self.revoke(grant, reason, self._pod_message(spec.pod_name, reason))
                return
        targets = [g.namespace for g in grant.grants]
        denied = reevaluate(
            spec, self.facts.policies(targets), self.facts.namespaces(targets), grant.policies
        )
        if denied:
            self.revoke(grant, denied.reason, denied.message, detail=denied.detail)

    @staticmethod
    def _pod_message(pod: str, reason: Reason) -> str:
        return {
            Reason.POD_DELETED: f"pod {pod} was deleted",
            Reason.POD_SUCCEEDED: f"pod {pod} succeeded",
            Reason.POD_FAILED: f"pod {pod} failed",
        }[reason]

    # -- issuance --------------------------------------------------------------------------

    def issue(self, task: Mapping[str, Any]) -> None:
        try:
            spec = parse_task(task)
        except SpecError as exc:
            self._deny(task, Denied(Reason.INVALID_SPEC, str(exc)), None)
            return
        if spec.cancel:
            self._end_unissued(task, spec, Reason.CANCELLED, "cancelled before access was granted")
            return
        generation = self.registry.generation
        world = self.facts.world(spec)
        decision = evaluate(spec, world, self.clock(), self.guardrails)
        if isinstance(decision, Denied):
            self._deny(task, decision, spec)
            return
        self._grant(task, spec, world, decision, generation)

    def _deny(self, task: Mapping[str, Any], denied: Denied, spec: TaskSpec | None) -> None:
        now = self.clock()
        uid = task["metadata"]["uid"]
        self._first_seen.pop(uid, None)
        self.ended.add(uid)
        self._write_status(
            task, st.denied(task, denied.reason, denied.message, now, _requester(spec))
        )
        self._event(task, "Warning", denied.reason, denied.message, "Deny", spec)
        self.audit.write(
            audit.record(
                "denied",
                task,
                reason=denied.reason,
                phase=Phase.DENIED,
                message=denied.message,
                detail=denied.detail or None,
                requested=_requested(spec) if spec else [],
                requester=_requester(spec),
                ended_at=st.rfc3339(now),
                now=now,
            )
        )
        self.metrics.denied(denied.reason)

    def _end_unissued(self, task: Mapping[str, Any], spec: TaskSpec, reason: Reason, msg: str):
        now = self.clock()
        uid = task["metadata"]["uid"]
        self._first_seen.pop(uid, None)
        self.ended.add(uid)
        self._write_status(task, st.ended(task, reason, msg, now, _requester(spec)))
        self._event(task, "Normal", reason, msg, "Revoke", spec)
        self.audit.write(
            audit.record(
                "ended",
                task,
                reason=reason,
                phase=st.END_PHASE[reason],
                message=msg,
                requested=_requested(spec),
                requester=_requester(spec),
                ended_at=st.rfc3339(now),
                now=now,
            )
        )

    def _create_objects(
        self, task: Mapping[str, Any], plan: LiveGrant, decision: Granted, pod: PodFacts | None
    ) -> dict[ObjectRef, str]:
        """Create every object of the grant; raise KubeError on the first failure.

        Returns the UID of each object created (revocation deletes exactly those).
        """
        ns, uid = plan.namespace, plan.uid
        created: dict[ObjectRef, str] = {}

        def make(kind: str, body: dict[str, Any]) -> dict[str, Any]:
            obj = self.owned.create(kind, body, uid)
            meta = body["metadata"]
            created[(kind, meta["namespace"], meta["name"])] = obj["metadata"]["uid"]
            return obj

        owners = objects.owners_in_task_namespace(task, (pod.name, pod.uid) if pod else None)
        record = {
            ANNOTATION_EXPIRES_AT: st.rfc3339(decision.expires_at),
            ANNOTATION_GRANTED_AT: st.rfc3339(decision.granted_at),
            ANNOTATION_POLICIES: ",".join(decision.policy_keys),
        }
        if pod:
            record[ANNOTATION_POD_UID] = pod.uid
        try:
            make(
                SERVICE_ACCOUNT,
                objects.service_account(task, plan.service_account, owners, record),
            )
            checkpoint("issue:serviceaccount")
            for g in plan.grants:
                make(ROLE, objects.role(task, g.namespace, g.role, g.rules))
                checkpoint("issue:role")
                make(
                    ROLE_BINDING,
                    objects.role_binding(task, g.namespace, g.binding, ns, plan.service_account),
                )
                checkpoint("issue:rolebinding")
            expires = st.rfc3339(decision.expires_at)
            secret = make(
                SECRET,
                objects.token_secret(task, plan.secret, owners, plan.service_account, expires),
            )
            checkpoint("issue:secret")
            make(ROLE, objects.token_reader_role(task, plan.reader, plan.secret))
            make(ROLE_BINDING, objects.token_reader_binding(task, plan.reader, plan.spec.agent))
            token, _ = self.kube.request_token(
                ns,
                plan.service_account,
                objects.token_seconds(int(decision.ttl.total_seconds())),
                plan.spec.audiences,
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "name": plan.secret,
                    "uid": secret["metadata"]["uid"],
                },
            )
            encoded = base64.b64encode(token.encode()).decode()
            del token
            self.kube.merge_patch(SECRETS, ns, plan.secret, {"data": {"token": encoded}})
            checkpoint("issue:token")
        except KubeError:
            self.delete_objects(replace(plan, object_uids=created))
            raise
        return created

    def _grant(
        self,
        task: Mapping[str, Any],
        spec: TaskSpec,
        world: World,
        decision: Granted,
        generation: int,
    ) -> None:
        plan = planned_grant(task, spec)
        plan = replace(
            plan,
            grants=tuple(
                NamespaceGrant(g.namespace, plan.service_account, plan.service_account, g.rules)
                for g in decision.grants
            ),
            policies=tuple(decision.policy_keys),
            expires_at=decision.expires_at,
            granted_at=decision.granted_at,
            pod_uid=world.pod.uid if world.pod else None,
        )
        try:
            plan = replace(plan, object_uids=self._create_objects(task, plan, decision, world.pod))
        except KubeError as exc:
            log.warning("issuing %s failed: %s", plan.ref, exc)
            self._end_unissued(task, spec, Reason.ISSUE_FAILED, f"could not issue the grant: {exc}")
            self.metrics.issue_failed()
            return
        uid = plan.uid
        self.registry.add(plan)
        self.deadlines.schedule(uid, decision.expires_at)
        now = self.clock()
        new_status = self._active_status(task, plan)
        # The audit line goes first (write-ahead): a token exists now. A crash from here
        # on can repeat the line, never lose it.
        self.audit.write(
            audit.record(
                "granted",
                task,
                reason=Reason.POLICY_ALLOWED,
                phase=Phase.ACTIVE,
                message=new_status["message"],
                requested=_requested(spec),
                requester=_requester(spec),
                granted=[g.to_status() for g in plan.grants],
                policies=[
                    {"name": p.key, "kind": p.kind, "resourceVersion": p.resource_version}
                    for p in decision.policies
                ],
                objects=self._object_list(plan),
                granted_at=st.rfc3339(decision.granted_at),
                expires_at=st.rfc3339(decision.expires_at),
                now=now,
            )
        )
        try:
            self._write_status(task, new_status)
        except KubeError as exc:
            # The task went away or cannot record its grant: take everything back.
            log.warning("recording the grant of %s failed (%s); revoking", plan.ref, exc)
            self.revoke(
                plan, Reason.ISSUE_FAILED, f"could not record the grant: {exc}", write_status=False
            )
            if not isinstance(exc, NotFound):
                raise
            return
        checkpoint("issue:status")
        self._event(task, "Normal", Reason.POLICY_ALLOWED, new_status["message"], "Grant", spec)
        self.metrics.granted(self._first_seen.pop(uid, None) or plan.created_at, now)
        # Something that may end grants (a pod finishing, a policy, namespace or agent
        # change; each bumps the generation before it looks at the registry) happened
        # while we were issuing: check now. Otherwise the handlers see it in the registry.
        if self.registry.generation != generation:
            self._recheck_soon(uid)

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

    def _active_status(self, task: Mapping[str, Any], grant: LiveGrant) -> dict[str, Any]:
        assert grant.granted_at and grant.expires_at
        rules = sum(len(g.rules) for g in grant.grants)
        where = ", ".join(sorted({g.namespace for g in grant.grants}))
        message = (
            f"granted {rules} rule{'s' if rules != 1 else ''} in {where} until "
            f"{st.rfc3339(grant.expires_at)} by {', '.join(grant.policies)}"
        )
        new_status = st.active(
            task,
            message,
            grant.service_account,
            grant.secret,
            grant.granted_at,
            grant.expires_at,
            list(grant.policies),
            [g.to_status() for g in grant.grants],
            self.clock(),
            _requester(grant.spec),
        )
        if grant.pod_uid:
            new_status["podUID"] = grant.pod_uid
        return new_status

    @staticmethod
    def _object_list(grant: LiveGrant) -> list[dict[str, str]]:
        return [{"kind": k, "namespace": ns, "name": n} for k, ns, n in grant.objects()]

    # -- revocation --------------------------------------------------------------------------

    def delete_objects(self, grant: LiveGrant) -> datetime:
        """Bindings first (requests fail with 403 at once), then the identity, then Roles.

        Only the task's own objects are deleted (see `owned`). Returns when the
        bindings were gone.
        """
        self.owned.delete_grant_part(grant, grant.bindings())
        bindings_gone = self.clock()
        checkpoint("revoke:rolebindings")
        sa, secret = grant.identity()
        self.owned.delete_grant_part(grant, [sa])
        checkpoint("revoke:serviceaccount")
        self.owned.delete_grant_part(grant, [secret])
        checkpoint("revoke:secret")
        self.owned.delete_grant_part(grant, grant.roles())
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
    ) -> bool:
        """End a live grant once, whatever raced to end it. True if this call ended it."""
        triggered_at = triggered_at or self.clock()
        with self.registry.lock(grant.uid):
            if self.registry.get(grant.uid) is None:
                return False
            try:
                bindings_gone = self.delete_objects(grant)
            except KubeError as exc:
                log.error("revoking %s failed, retrying: %s", grant.ref, exc)  # every 0.5 s
                self._retry[grant.uid] = (reason, message)
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
        self.audit.write(
            audit.record(
                "expired" if reason == Reason.TTL_EXPIRED else "revoked",
                stub,
                reason=reason,
                phase=st.END_PHASE[reason],
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
            )
        )
        if write_status:
            self._record_end(stub, st.ended(stub, reason, message, now))
            checkpoint("revoke:status")
        self._event(stub, "Normal", reason, message, "Revoke", grant.spec)
        self.registry.forget_lock(grant.uid)
        return True

    def revoke_many(self, items: list[tuple[LiveGrant, Reason, str, str]]) -> None:
        """Revoke in parallel; bindings of every grant go before any other deletion."""
        if not items:
            return
        triggered = self.clock()
        for grant, _, _, _ in items:  # 403 for all of them first
            self.pool.submit(self.owned.delete_grant_part, grant, grant.bindings())
        futures = [
            self.pool.submit(self.revoke, g, r, m, None, True, triggered, d) for g, r, m, d in items
        ]
        for f in futures:
            f.result()

    def _record_end(self, stub: dict[str, Any], status: dict[str, Any]) -> None:
        """Write an ended grant's status; on an API error, again shortly."""
        uid = stub["metadata"]["uid"]
        try:
            self._write_status(stub, status)
        except NotFound:
            pass
        except KubeError as exc:
            log.warning("could not record the end of %s (%s); again shortly", uid, exc)
            self._pending_status[uid] = (stub, status)
            self.deadlines.schedule(uid, self.clock() + RETRY_DELAY)

    # -- triggers ------------------------------------------------------------------------------

    def on_deadline(self, uid: str) -> None:
        grant = self.registry.get(uid)
        if grant is None:
            pending = self._pending_status.pop(uid, None)
            if pending:
                self._record_end(*pending)
            return
        retry = self._retry.get(uid)
        if retry:
            self.revoke(grant, *retry)
        elif grant.expires_at and grant.expires_at <= self.clock() + timedelta(milliseconds=50):
            self.revoke(grant, Reason.TTL_EXPIRED, "the TTL ran out", triggered_at=grant.expires_at)
        elif uid in self._pending_recheck:
            self._pending_recheck.discard(uid)
            self.deadlines.schedule(uid, grant.expires_at or self.clock())
            self._recheck_soon(uid)
        elif grant.expires_at:
            self.deadlines.schedule(uid, grant.expires_at)

    def on_pod(self, event_type: str | None, pod: Mapping[str, Any]) -> None:
        facts = pod_facts(pod)
        assert facts is not None
        gone = event_type == "DELETED"
        finishing = gone or facts.deleting or facts.phase in ("Succeeded", "Failed")
        if not finishing:
            return
        self.registry.bump()
        ns = pod["metadata"]["namespace"]
        for grant in self.registry.for_pod(ns, facts.name):
            if grant.pod_uid and grant.pod_uid != facts.uid:
                continue  # an event about an older pod of the same name
            reason = pod_end_reason(None if gone else facts, grant.pod_uid)
            if reason:
                self.revoke(grant, reason, self._pod_message(facts.name, reason))

    def on_service_account_deleted(self, namespace: str, name: str) -> None:
        self.registry.bump()
        for grant in self.registry.for_agent(namespace, name):
            self.revoke(
                grant, Reason.AGENT_NOT_FOUND, f"agent ServiceAccount {namespace}/{name} deleted"
            )

    def on_policy_change(self, namespace: str | None) -> None:
        """An AccessPolicy (namespace set) or ClusterAccessPolicy changed or went away."""
        self.registry.bump()
        affected = self.registry.for_target([namespace] if namespace else None)
        if affected:
            self._reevaluate(affected)

    def on_namespace_change(self, name: str) -> None:
        self.registry.bump()  # a grant being issued into it right now re-checks too
        affected = self.registry.for_target([name])
        if affected:
            self._reevaluate(affected)

    def _reevaluate(self, grants: list[LiveGrant]) -> None:
        targets = sorted({g.namespace for grant in grants for g in grant.grants})
        policies = self.facts.policies(targets if len(targets) <= 3 else None)
        namespaces = self.facts.namespaces(targets if len(targets) <= 3 else None)
        ending = []
        for grant in grants:
            try:
                denied = reevaluate(grant.spec, policies, namespaces, grant.policies)
            except Exception:  # one grant's trouble never spares the others
                log.exception("re-evaluating %s failed; revoking it", grant.ref)
                denied = Denied(Reason.POLICY_CHANGED, "policies changed; could not re-evaluate")
            if denied:
                ending.append((grant, denied.reason, denied.message, denied.detail))
        self.revoke_many(ending)

    def on_task_deleted(self, task: Mapping[str, Any]) -> None:
        meta = task["metadata"]
        uid = meta["uid"]
        phase = (task.get("status") or {}).get("phase")
        grant = self.registry.get(uid)
        self._first_seen.pop(uid, None)
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
        self.ended.discard(uid)

    def on_task_gone(self, task: Mapping[str, Any]) -> None:
        """The task vanished without passing the finalizer (an admin removed it):
        a live grant still ends."""
        grant = self.registry.get(task["metadata"]["uid"])
        if grant is not None:
            self.on_task_deleted(task)
        self.ended.discard(task["metadata"]["uid"])

    # -- start-up ------------------------------------------------------------------------------

    def start(self) -> None:
        from .recovery import recover

        recover(self)

    # -- writing -----------------------------------------------------------------------------

    def _write_status(self, task: Mapping[str, Any], status: Mapping[str, Any]) -> None:
        meta = task["metadata"]
        self.kube.merge_patch(
            AGENT_TASKS, meta["namespace"], meta["name"], {"status": _compact(status)}, "status"
        )

    def _event(
        self,
        task: Mapping[str, Any],
        kind: str,
        reason: str,
        message: str,
        action: str,
        spec: TaskSpec | None = None,
    ) -> None:
        requester = spec.requester.username if spec and spec.requester else None
        if requester:
            message = f"{message} (requester {requester})"
        try:
            self.kube.post_event(task, kind, str(reason), message, action)
        except KubeError as exc:
            log.warning("could not post event on %s: %s", task["metadata"].get("name"), exc)
