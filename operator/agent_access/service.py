"""Grant service: gathers facts, asks the engine, issues and revokes.

The kopf handlers call into this module; it calls the adapter (`kube`) and the
pure core (`engine`, `objects`, `status`). It owns the all-or-nothing issuance
and the revocation order: bindings first (403 at once), then the identity
(ServiceAccount, token Secret: 401), then the Roles.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable, Iterable, Mapping
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
    Policy,
    SpecError,
    TaskSpec,
    World,
    evaluate,
    parse_policy,
    parse_task_spec,
    reevaluate,
)
from .faults import checkpoint
from .kube import (
    ACCESS_POLICIES,
    AGENT_TASKS,
    CLUSTER_ACCESS_POLICIES,
    NAMESPACES,
    PODS,
    ROLE_BINDINGS,
    ROLES,
    SECRETS,
    SERVICE_ACCOUNTS,
    Conflict,
    Kube,
    KubeError,
    NotFound,
    Resource,
)
from .metrics import Metrics
from .model import (
    API_VERSION,
    LABEL_MANAGED_BY,
    LABEL_TASK_UID,
    MANAGED_BY,
    Phase,
    Reason,
)
from .rules import DEFAULT_GUARDRAILS, Guardrails
from .runtime import Deadlines, LiveGrant, NamespaceGrant, Registry, grant_from_task, planned_grant

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
        },
    }


def _requested(spec: TaskSpec) -> list[dict[str, Any]]:
    return [
        {"namespace": e.namespace, "rules": [r.to_dict() for r in e.rules]} for e in spec.access
    ]


def _namespace_labels(items: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, str]]:
    """{name: labels} of the namespaces that exist (one being deleted does not)."""
    return {
        ns["metadata"]["name"]: ns["metadata"].get("labels") or {}
        for ns in items
        if not ns["metadata"].get("deletionTimestamp")
    }


def _is_active(task: Mapping[str, Any]) -> bool:
    return (task.get("status") or {}).get("phase") == Phase.ACTIVE.value and not task[
        "metadata"
    ].get("deletionTimestamp")


def _expired(task: Mapping[str, Any], now: datetime) -> bool:
    from .runtime import parse_time

    expires = parse_time((task.get("status") or {}).get("expiresAt"))
    return expires is not None and expires <= now


def pod_facts(pod: Mapping[str, Any] | None) -> PodFacts | None:
    if not pod:
        return None
    meta, spec = pod.get("metadata", {}), pod.get("spec") or {}
    return PodFacts(
        name=meta.get("name", ""),
        uid=meta.get("uid", ""),
        service_account=spec.get("serviceAccountName") or spec.get("serviceAccount") or "default",
        phase=(pod.get("status") or {}).get("phase", ""),
        deleting=bool(meta.get("deletionTimestamp")),
    )


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
        self.deadlines = Deadlines(lambda uid: self.pool.submit(self.on_deadline, uid))
        self._retry: dict[str, tuple[Reason, str]] = {}
        #: When the operator first received each not-yet-decided task (grant latency).
        self._first_seen: dict[str, datetime] = {}
        self.ready = False
        metrics.bind_registry(self.registry, self.clock)

    def close(self) -> None:
        self.deadlines.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.io.shutdown(wait=False, cancel_futures=True)

    # -- facts ---------------------------------------------------------------------

    def _policies(self, namespaces: Iterable[str] | None) -> list[Policy]:
        if namespaces is None:
            raw = self.kube.list(ACCESS_POLICIES)
        else:
            raw = [p for ns in namespaces for p in self.kube.list(ACCESS_POLICIES, ns)]
        return self._parse_policies(raw, self.kube.list(CLUSTER_ACCESS_POLICIES))

    @staticmethod
    def _parse_policies(namespaced: list[dict], cluster: list[dict]) -> list[Policy]:
        out = []
        for body in namespaced + [dict(b, kind="ClusterAccessPolicy") for b in cluster]:
            body.setdefault("kind", "AccessPolicy")
            try:
                out.append(parse_policy(body))
            except SpecError as exc:
                meta = body.get("metadata", {})
                log.warning(
                    "ignoring policy %s/%s: %s", meta.get("namespace"), meta.get("name"), exc
                )
        return out

    def _namespaces(self, names: Iterable[str] | None) -> dict[str, dict[str, str]]:
        if names is None:
            items = self.kube.list(NAMESPACES)
        else:
            items = [ns for n in names if (ns := self.kube.get(NAMESPACES, None, n))]
        return _namespace_labels(items)

    def gather_world(self, spec: TaskSpec) -> World:
        """Read every fact the decision needs, concurrently (one round trip, not five)."""
        targets = spec.target_namespaces
        submit = self.io.submit
        namespaces = [submit(self.kube.get, NAMESPACES, None, t) for t in targets]
        policies = [submit(self.kube.list, ACCESS_POLICIES, t) for t in targets]
        cluster = submit(self.kube.list, CLUSTER_ACCESS_POLICIES)
        agent = submit(self.kube.get, SERVICE_ACCOUNTS, spec.namespace, spec.agent)
        pod = submit(self.kube.get, PODS, spec.namespace, spec.pod_name) if spec.pod_name else None
        return World(
            policies=self._parse_policies(
                [p for f in policies for p in f.result()], cluster.result()
            ),
            namespaces=_namespace_labels([ns for f in namespaces if (ns := f.result())]),
            agent_exists=agent.result() is not None,
            pod=pod_facts(pod.result()) if pod else None,
        )

    # -- the main reconcile ------------------------------------------------------------

    def seen(self, task: Mapping[str, Any]) -> None:
        """Note when an undecided task was first received (its creationTimestamp has
        whole-second precision, too coarse for latency)."""
        if not (task.get("status") or {}).get("phase"):
            self._first_seen.setdefault(task["metadata"]["uid"], self.clock())

    def reconcile(self, task: Mapping[str, Any]) -> None:
        """Create, resume or update of an AgentTask: bring it to a correct phase."""
        phase = (task.get("status") or {}).get("phase")
        uid = task["metadata"]["uid"]
        if phase in TERMINAL:
            self.registry.remove(uid)
            return
        if phase == Phase.ACTIVE.value:
            grant = grant_from_task(task)
            if grant is None:
                return
            generation = task["metadata"].get("generation")
            if self.registry.get(uid) is None:
                self.registry.add(grant)
                if grant.expires_at:
                    self.deadlines.schedule(uid, grant.expires_at)
            if grant.spec.cancel:
                self.revoke(grant, Reason.CANCELLED, "cancelled by spec.cancel", generation)
            else:
                self.recheck(grant)
            return
        self.issue(task)

    def recheck(self, grant: LiveGrant) -> None:
        """Verify a live grant against the cluster now; revoke it if it must end."""
        now = self.clock()
        if grant.expires_at and grant.expires_at <= now:
            self.revoke(grant, Reason.TTL_EXPIRED, "the TTL ran out")
            return
        spec = grant.spec
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
            spec, self._policies(targets), self._namespaces(targets), grant.policies
        )
        if denied:
            self.revoke(grant, denied.reason, denied.message)

    @staticmethod
    def _pod_message(pod: str, reason: Reason) -> str:
        return {
            Reason.POD_DELETED: f"pod {pod} was deleted",
            Reason.POD_SUCCEEDED: f"pod {pod} succeeded",
            Reason.POD_FAILED: f"pod {pod} failed",
        }[reason]

    # -- issuance --------------------------------------------------------------------------

    def issue(self, task: Mapping[str, Any]) -> None:
        meta = task["metadata"]
        try:
            spec = parse_task_spec(meta["namespace"], task.get("spec") or {})
        except SpecError as exc:
            self._deny(task, Denied(Reason.INVALID_SPEC, str(exc)), None)
            return
        if spec.cancel:
            self._end_unissued(task, spec, Reason.CANCELLED, "cancelled before access was granted")
            return
        generation = self.registry.generation
        world = self.gather_world(spec)
        decision = evaluate(spec, world, self.clock(), self.guardrails)
        if isinstance(decision, Denied):
            self._deny(task, decision, spec)
            return
        self._grant(task, spec, world, decision, generation)

    def _deny(self, task: Mapping[str, Any], denied: Denied, spec: TaskSpec | None) -> None:
        now = self.clock()
        self._first_seen.pop(task["metadata"]["uid"], None)
        self._write_status(task, st.denied(task, denied.reason, denied.message, now))
        self._event(task, "Warning", denied.reason, denied.message, "Deny")
        self.audit.write(
            audit.record(
                "denied",
                task,
                reason=denied.reason,
                phase=Phase.DENIED,
                message=denied.message,
                requested=_requested(spec) if spec else task.get("spec", {}).get("access") or [],
                ended_at=st.rfc3339(now),
                now=now,
            )
        )
        self.metrics.denied(denied.reason)

    def _end_unissued(self, task: Mapping[str, Any], spec: TaskSpec, reason: Reason, msg: str):
        now = self.clock()
        self._first_seen.pop(task["metadata"]["uid"], None)
        self._write_status(task, st.ended(task, reason, msg, now))
        self._event(task, "Normal", reason, msg, "Revoke")
        self.audit.write(
            audit.record(
                "ended",
                task,
                reason=reason,
                phase=st.END_PHASE[reason],
                message=msg,
                requested=_requested(spec),
                ended_at=st.rfc3339(now),
                now=now,
            )
        )

    def _create_afresh(self, res: Resource, namespace: str, body: dict[str, Any]) -> dict:
        """Create; an object of that name left by an interrupted attempt is replaced."""
        try:
            return self.kube.create(res, namespace, body)
        except Conflict:
            self.kube.delete(res, namespace, body["metadata"]["name"])
            return self.kube.create(res, namespace, body)

    def _create_objects(
        self, task: Mapping[str, Any], plan: LiveGrant, decision: Granted, pod: PodFacts | None
    ) -> None:
        """Create every object of the grant; raise KubeError on the first failure."""
        ns = plan.namespace
        owners = objects.owners_in_task_namespace(task, (pod.name, pod.uid) if pod else None)
        self._create_afresh(
            SERVICE_ACCOUNTS, ns, objects.service_account(task, plan.service_account, owners)
        )
        checkpoint("issue:serviceaccount")
        for g in plan.grants:
            self._create_afresh(
                ROLES, g.namespace, objects.role(task, g.namespace, g.role, g.rules)
            )
            checkpoint("issue:role")
            self._create_afresh(
                ROLE_BINDINGS,
                g.namespace,
                objects.role_binding(task, g.namespace, g.binding, ns, plan.service_account),
            )
            checkpoint("issue:rolebinding")
        expires = st.rfc3339(decision.expires_at)
        secret = self._create_afresh(
            SECRETS,
            ns,
            objects.token_secret(task, plan.secret, owners, plan.service_account, expires),
        )
        checkpoint("issue:secret")
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
            self._create_objects(task, plan, decision, world.pod)
        except KubeError as exc:
            log.warning("issuing %s failed: %s", plan.ref, exc)
            self.delete_objects(plan)
            self._end_unissued(task, spec, Reason.ISSUE_FAILED, f"could not issue the grant: {exc}")
            self.metrics.issue_failed()
            return
        uid = plan.uid
        self.registry.add(plan)
        self.deadlines.schedule(uid, decision.expires_at)
        now = self.clock()
        message = decision.summary()
        new_status = st.active(
            task,
            message,
            plan.service_account,
            plan.secret,
            decision.granted_at,
            decision.expires_at,
            decision.policy_keys,
            [g.to_status() for g in plan.grants],
            now,
        )
        if plan.pod_uid:
            new_status["podUID"] = plan.pod_uid
        # The audit line goes first (write-ahead): a token exists now. A crash from here
        # on can repeat the line, never lose it.
        self.audit.write(
            audit.record(
                "granted",
                task,
                reason=Reason.POLICY_ALLOWED,
                phase=Phase.ACTIVE,
                message=message,
                requested=_requested(spec),
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
        self._event(task, "Normal", Reason.POLICY_ALLOWED, message, "Grant")
        self.metrics.granted(self._first_seen.pop(uid, None) or plan.created_at, now)
        # Something that may end grants (a pod finishing, a policy or agent change; each
        # bumps the generation before it looks at the registry) happened while we were
        # issuing: check now. Otherwise the handlers will see this grant in the registry.
        if self.registry.generation != generation:
            live = self.registry.get(uid)
            if live:
                self.recheck(live)

    @staticmethod
    def _object_list(grant: LiveGrant) -> list[dict[str, str]]:
        out = [
            {"kind": "ServiceAccount", "namespace": grant.namespace, "name": grant.service_account},
            {"kind": "Secret", "namespace": grant.namespace, "name": grant.secret},
        ]
        for g in grant.grants:
            out.append({"kind": "Role", "namespace": g.namespace, "name": g.role})
            out.append({"kind": "RoleBinding", "namespace": g.namespace, "name": g.binding})
        return out

    # -- revocation --------------------------------------------------------------------------

    def delete_objects(self, grant: LiveGrant) -> datetime:
        """Bindings first (requests fail with 403 at once), then the identity, then Roles.

        Returns when the bindings were gone.
        """
        for g in grant.grants:
            self.kube.delete(ROLE_BINDINGS, g.namespace, g.binding)
        bindings_gone = self.clock()
        checkpoint("revoke:rolebindings")
        self.kube.delete(SERVICE_ACCOUNTS, grant.namespace, grant.service_account)
        checkpoint("revoke:serviceaccount")
        self.kube.delete(SECRETS, grant.namespace, grant.secret)
        checkpoint("revoke:secret")
        for g in grant.grants:
            self.kube.delete(ROLES, g.namespace, g.role)
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
            self.registry.remove(grant.uid)
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
                requested=_requested(grant.spec),
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
            try:
                self._write_status(stub, st.ended(stub, reason, message, now))
            except NotFound:
                pass
            except KubeError as exc:
                log.warning("could not record the end of %s: %s", grant.ref, exc)
            checkpoint("revoke:status")
        self._event(stub, "Normal", reason, message, "Revoke")
        self.registry.forget_lock(grant.uid)
        return True

    def revoke_many(self, items: list[tuple[LiveGrant, Reason, str]]) -> None:
        """Revoke in parallel; bindings of every grant go before any other deletion."""
        if not items:
            return
        triggered = self.clock()
        for grant, _, _ in items:  # 403 for all of them first
            for g in grant.grants:
                self.pool.submit(self.kube.delete, ROLE_BINDINGS, g.namespace, g.binding)
        futures = [
            self.pool.submit(self.revoke, g, r, m, None, True, triggered) for g, r, m in items
        ]
        for f in futures:
            f.result()

    # -- triggers ------------------------------------------------------------------------------

    def on_deadline(self, uid: str) -> None:
        grant = self.registry.get(uid)
        if grant is None:
            return
        retry = self._retry.get(uid)
        if retry:
            self.revoke(grant, *retry)
        elif grant.expires_at and grant.expires_at <= self.clock() + timedelta(milliseconds=50):
            self.revoke(grant, Reason.TTL_EXPIRED, "the TTL ran out", triggered_at=grant.expires_at)
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
        affected = self.registry.for_target([name])
        if affected:
            self._reevaluate(affected)

    def _reevaluate(self, grants: list[LiveGrant]) -> None:
        targets = sorted({g.namespace for grant in grants for g in grant.grants})
        policies = self._policies(targets if len(targets) <= 3 else None)
        namespaces = self._namespaces(targets if len(targets) <= 3 else None)
        ending = []
        for grant in grants:
            denied = reevaluate(grant.spec, policies, namespaces, grant.policies)
            if denied:
                ending.append((grant, denied.reason, denied.message))
        self.revoke_many(ending)

    def on_task_deleted(self, task: Mapping[str, Any]) -> None:
        meta = task["metadata"]
        phase = (task.get("status") or {}).get("phase")
        grant = self.registry.get(meta["uid"])
        self._first_seen.pop(meta["uid"], None)
        message = "the AgentTask was deleted"
        if grant is not None:
            self.revoke(grant, Reason.TASK_DELETED, message, write_status=False)
            return
        # Not live here: remove whatever an interrupted issuance may have left.
        leftover = grant_from_task(task)
        if leftover is not None and phase not in TERMINAL:
            self.delete_objects(leftover)
        self._event(task, "Normal", Reason.TASK_DELETED, message, "Delete")
        self.audit.write(
            audit.record(
                "deleted",
                task,
                reason=Reason.TASK_DELETED,
                phase=phase or Phase.PENDING,
                message=message,
                requested=task.get("spec", {}).get("access") or [],
                ended_at=st.rfc3339(self.clock()),
            )
        )

    # -- start-up ------------------------------------------------------------------------------

    def start(self) -> None:
        """Before watching: end grants that expired while the operator was down, at once,
        and delete objects we created whose task is gone or no longer Active."""
        tasks = self.kube.list(AGENT_TASKS)
        now = self.clock()
        for task in tasks:
            grant = grant_from_task(task) if _is_active(task) else None
            if grant and grant.expires_at and grant.expires_at <= now:
                self.registry.add(grant)
                self.revoke(
                    grant,
                    Reason.TTL_EXPIRED,
                    "the TTL ran out while the operator was down",
                    triggered_at=grant.expires_at,
                )
        self.sweep_orphans(tasks)

    def sweep_orphans(self, tasks: list[dict[str, Any]] | None = None) -> int:
        """Delete objects we created whose task is gone or no longer Active."""
        tasks = self.kube.list(AGENT_TASKS) if tasks is None else tasks
        live = {
            t["metadata"]["uid"] for t in tasks if _is_active(t) and not _expired(t, self.clock())
        }
        selector = f"{LABEL_MANAGED_BY}={MANAGED_BY}"
        removed = 0
        for res in (ROLE_BINDINGS, SERVICE_ACCOUNTS, ROLES):
            for obj in self.kube.list(res, None, label_selector=selector):
                m = obj["metadata"]
                if (m.get("labels") or {}).get(LABEL_TASK_UID) in live:
                    continue
                removed += self.kube.delete(res, m["namespace"], m["name"])
                if res is SERVICE_ACCOUNTS:  # its token Secret shares the name
                    self.kube.delete(SECRETS, m["namespace"], f"{m['name']}-token")
        if removed:
            log.info("removed %d orphaned objects", removed)
        return removed

    # -- writing -----------------------------------------------------------------------------

    def _write_status(self, task: Mapping[str, Any], status: Mapping[str, Any]) -> None:
        meta = task["metadata"]
        self.kube.merge_patch(
            AGENT_TASKS, meta["namespace"], meta["name"], {"status": _compact(status)}, "status"
        )

    def _event(self, task: Mapping[str, Any], kind: str, reason: str, message: str, action: str):
        try:
            self.kube.post_event(task, kind, str(reason), message, action)
        except KubeError as exc:
            log.warning("could not post event on %s: %s", task["metadata"].get("name"), exc)
