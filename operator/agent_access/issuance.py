"""Issuance: decide a task and, when allowed, create its grant, all or nothing.

A mixin of the grant service (service.py), which owns the state it uses (registry,
deadlines, the adapter) and revocation; split out to keep each concern readable.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from . import audit, objects
from . import status as st
from .authz import credential_hash, token_credential
from .engine import Denied, Granted, PodFacts, SpecError, TaskSpec, World, evaluate, parse_task
from .facts import Facts
from .faults import checkpoint
from .kube import AGENT_TASKS, Kube, KubeError, NotFound
from .metrics import Metrics
from .model import (
    ANNOTATION_EXPIRES_AT,
    ANNOTATION_GRANTED_AT,
    ANNOTATION_POD_UID,
    ANNOTATION_POLICIES,
    ANNOTATION_PRESET_RULES,
    ANNOTATION_STAGE,
    ANNOTATION_TASK_EXPIRES_AT,
    API_VERSION,
    Phase,
    Reason,
)
from .objects import stage_name
from .owned import Owned
from .stages import first_stages, parse_started

if TYPE_CHECKING:
    from .approvals import Waiting
    from .explain import Explainer
    from .limits import Limits
from .rules import Guardrails
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


def _policy_refs(decision: Granted) -> list[dict[str, str]]:
    """The policies that allowed it, as audit lines name them."""
    return [
        {"name": p.key, "kind": p.kind, "resourceVersion": p.resource_version}
        for p in decision.policies
    ]


def _requester(spec: TaskSpec | None) -> dict[str, Any] | None:
    return spec.requester.to_dict() if spec and spec.requester else None


class Issuance:
    """Decide and issue. Expects the attributes and methods of `service.Service`."""

    kube: Kube
    audit: audit.AuditLog
    metrics: Metrics
    guardrails: Guardrails
    clock: Callable[[], datetime]
    registry: Registry
    deadlines: Deadlines
    facts: Facts
    owned: Owned
    cpu: ThreadPoolExecutor
    io: ThreadPoolExecutor
    ended: set[str]
    _ending: set[str]
    _first_seen: dict[str, datetime]
    waiting: Waiting
    limits: Limits
    explainer: Explainer

    def revoke(self, grant: LiveGrant, reason: Reason, message: str, *args: Any, **kw: Any) -> bool:
        raise NotImplementedError

    if TYPE_CHECKING:  # approvals.Awaiting

        def gate(
            self,
            task: Mapping[str, Any],
            spec: TaskSpec,
            decision: Granted,
            since: datetime | None = None,
            end: Callable[[Phase, Reason, str, str, dict[str, Any]], None] | None = None,
        ) -> list[dict[str, Any]] | None: ...

    def delete_objects(self, grant: LiveGrant) -> datetime:
        raise NotImplementedError

    def _recheck_soon(self, uid: str) -> None:
        raise NotImplementedError

    def schedule_expiry(self, uid: str, expires_at: datetime) -> None:
        raise NotImplementedError

    _credentials: dict[str, str]

    def _write_status(
        self,
        task: Mapping[str, Any],
        status: Mapping[str, Any],
        exists: bool = False,
        partial: bool = False,
    ) -> None:
        """Write these status fields on this very task: a task that took its name since
        is refused by the UID test, never written over.

        A status that exists gets these fields (the others stay); a task without one
        (as the caller saw it, unless it says `exists`) gets this as its whole status.
        If the server's task differs from that view, the other form is tried once;
        when both are refused (422), the UID did not match. A `partial` status (a few
        fields of a status that must exist) is never written as the whole.
        """
        meta = task["metadata"]
        fields = _compact(status)
        test = {"op": "test", "path": "/metadata/uid", "value": meta["uid"]}
        each = [
            test,
            *({"op": "add", "path": f"/status/{k}", "value": v} for k, v in fields.items()),
        ]
        whole = [test, {"op": "add", "path": "/status", "value": fields}]
        if partial:
            self.kube.json_patch(AGENT_TASKS, meta["namespace"], meta["name"], each, "status")
            return
        forms = [each, whole] if exists or task.get("status") else [whole, each]
        try:
            self.kube.json_patch(AGENT_TASKS, meta["namespace"], meta["name"], forms[0], "status")
        except KubeError as exc:
            if exc.status != 422:
                raise
            self.kube.json_patch(AGENT_TASKS, meta["namespace"], meta["name"], forms[1], "status")

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
        world, watched = self.facts.world(spec)
        # Evaluation is pure CPU: one thread does it for everyone, so however many
        # costly requests arrive, they take one core's share and the revocation threads
        # keep getting the interpreter (the GIL) promptly.
        decision = self.cpu.submit(evaluate, spec, world, self.clock(), self.guardrails).result()
        if isinstance(decision, Denied) and watched:
            # Never deny on watched facts: what the task relies on may have been created
            # a moment before it and not have arrived yet. Read, and decide again.
            world = self.facts.world_from_api(spec)
            again = self.cpu.submit(evaluate, spec, world, self.clock(), self.guardrails)
            decision = again.result()
        if isinstance(decision, Denied):
            self._deny(task, decision, spec)
            return
        spec = decision.spec or spec  # presets replaced by their rules
        if spec.dry_run:
            limited = self.limits.count(spec, decision.policies)
            if limited:
                self._deny(task, limited, spec)
            else:
                self._dry_run(task, spec, decision)
            return
        approvals = self.gate(task, spec, decision, since=self._first_stage_since(task, spec))
        if approvals is None:  # waiting for approval, or ended by it
            return
        uid = task["metadata"]["uid"]
        limited = self.limits.reserve(uid, spec, decision.policies)
        if limited:
            self._deny(task, limited, spec)
            return
        try:
            self._grant(task, spec, world, decision, generation, approvals)
        finally:  # live now (counted by the registry), or not issued
            self.limits.release(uid)

    def _first_stage_since(self, task: Mapping[str, Any], spec: TaskSpec) -> datetime | None:
        """A staged task's first stage to be issued waits from the task's creation; if
        spec.stage moved while it waited, the new stage waits from when that was seen
        (approvals made for the stage before do not count for this one)."""
        if not spec.staged:
            return None
        status = task.get("status") or {}
        if not status.get("stage"):
            return None  # from the task's creation
        if status["stage"] == spec.stage:
            entries = status.get("stages") or []
            started = [e.get("startedAt") for e in entries if isinstance(e, Mapping)
                       and e.get("name") == spec.stage]  # fmt: skip
            return parse_started(started[-1]) or self.clock() if started else self.clock()
        return self.clock()

    def _dry_run(self, task: Mapping[str, Any], spec: TaskSpec, decision: Granted) -> None:
        """Granted, but only on paper: audit line, status, Event; nothing is created."""
        now = self.clock()
        uid = task["metadata"]["uid"]
        self._first_seen.pop(uid, None)
        message = "dry run: would be " + decision.summary()
        needing = [p for p in decision.policies if p.approval and p.approval.required]
        if needing:
            message += (
                " after approval ("
                + ", ".join(f"{p.key}: {p.approval.required}" for p in needing if p.approval)
                + ")"
            )
        grants = [
            {"namespace": g.namespace, "rules": [r.to_dict() for r in g.rules]}
            for g in decision.grants
        ]
        self.audit.write(
            audit.record(
                "ended",
                task,
                reason=Reason.DRY_RUN,
                phase=Phase.COMPLETED,
                message=message,
                requested=_requested(spec),
                requester=_requester(spec),
                granted=grants,
                policies=_policy_refs(decision),
                expires_at=st.rfc3339(decision.expires_at),
                ended_at=st.rfc3339(now),
                now=now,
            )
        )
        self._write_status(
            task,
            st.dry_run(
                task, message, decision.expires_at, decision.policy_keys, grants, now,
                _requester(spec),
            ),
        )  # fmt: skip
        self.ended.add(uid)
        self._event(task, "Normal", Reason.DRY_RUN, message, "DryRun", spec)

    def _deny(self, task: Mapping[str, Any], denied: Denied, spec: TaskSpec | None) -> None:
        denied = self.explainer.explain(denied, spec.requester if spec else None)
        self._close(task, spec, Phase.DENIED, denied.reason, denied.message, denied.detail)
        self.metrics.denied(denied.reason)

    def _end_unissued(self, task: Mapping[str, Any], spec: TaskSpec, reason: Reason, msg: str):
        self._close(task, spec, st.END_PHASE[reason], reason, msg)

    def _close(
        self,
        task: Mapping[str, Any],
        spec: TaskSpec | None,
        phase: Phase,
        reason: Reason,
        message: str,
        detail: str = "",
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """A task ends without a grant: audit line, status, then Event. `extra`: more
        status fields (the approvals a decision rests on, the policies).

        The audit line goes first (write-ahead, as for grants): once the status shows
        the decision, the line exists; a retried write may repeat it, never lose it.
        """
        now = self.clock()
        uid = task["metadata"]["uid"]
        self._first_seen.pop(uid, None)
        denied = phase == Phase.DENIED
        self.audit.write(
            audit.record(
                "denied" if denied else "ended",
                task,
                reason=reason,
                phase=phase,
                message=message,
                detail=detail or None,
                requested=_requested(spec) if spec else [],
                requester=_requester(spec),
                ended_at=st.rfc3339(now),
                now=now,
                approvals=(extra or {}).get("approvals"),
            )
        )
        build = st.denied if denied else st.ended
        status = build(task, reason, message, now, _requester(spec))
        status.update(extra or {})
        self._write_status(task, status)
        self.ended.add(uid)  # only once recorded: a failed write is retried
        self.waiting.done(uid)
        kind, action = ("Warning", "Deny") if denied else ("Normal", "Revoke")
        self._event(task, kind, reason, message, action, spec)

    def _create_objects(
        self,
        task: Mapping[str, Any],
        plan: LiveGrant,
        decision: Granted,
        pod: PodFacts | None,
        with_identity: bool = True,
    ) -> dict[ObjectRef, str]:
        """Create every object of the grant; raise KubeError on the first failure.

        Three independent chains run at once (a Role or RoleBinding may name a
        ServiceAccount or Role that does not exist yet):
          identity:  ServiceAccount -> TokenRequest -> Secret holding the token
          access:    per target namespace, Role -> RoleBinding
          reader:    the agent's token-reader Role -> RoleBinding
        All or nothing: if any chain fails, every object any chain made is deleted
        (after all of them stopped). Returns the UID of each object created
        (revocation deletes exactly those).
        """
        ns, uid = plan.namespace, plan.uid
        created: dict[ObjectRef, str] = {}
        guard = threading.Lock()

        def make(kind: str, body: dict[str, Any]) -> dict[str, Any]:
            obj = self.owned.create(kind, body, uid)
            meta = body["metadata"]
            with guard:
                created[(kind, meta["namespace"], meta["name"])] = obj["metadata"]["uid"]
            return obj

        owners = objects.owners_in_task_namespace(task, (pod.name, pod.uid) if pod else None)
        assert plan.expires_at is not None
        record = {
            ANNOTATION_EXPIRES_AT: st.rfc3339(plan.expires_at),
            ANNOTATION_GRANTED_AT: st.rfc3339(decision.granted_at),
            ANNOTATION_POLICIES: ",".join(decision.policy_keys),
        }
        if plan.task_expires_at is not None:  # a staged task: its whole deadline, its stage
            record[ANNOTATION_TASK_EXPIRES_AT] = st.rfc3339(plan.task_expires_at)
            record[ANNOTATION_STAGE] = plan.spec.stage or ""
        if pod:
            record[ANNOTATION_POD_UID] = pod.uid
        presets = {g.namespace: [r.to_dict() for r in g.rules] for g in decision.grants if g.preset}
        if presets:
            record[ANNOTATION_PRESET_RULES] = json.dumps(presets, separators=(",", ":"))

        def identity() -> None:
            make(
                SERVICE_ACCOUNT,
                objects.service_account(task, plan.service_account, owners, record),
            )
            checkpoint("issue:serviceaccount")
            # The token is made first and stored with the Secret in one write. It is
            # not bound to the Secret: it dies with the ServiceAccount, which every
            # revocation (and the garbage collector, when a pod owns it) deletes.
            lifetime = plan.spec.task_ttl or decision.ttl  # a staged task's token: all stages
            token, _ = self.kube.request_token(
                ns,
                plan.service_account,
                objects.token_seconds(int(lifetime.total_seconds())),
                plan.spec.audiences,
                None,
            )
            encoded = base64.b64encode(token.encode()).decode()
            # the token's id as the API server names it in each request: its hash goes
            # into the status, so the enforcement point tells the token's calls from
            # access reviews others make about the identity (docs/authorization-webhook.md)
            credential = token_credential(token)
            self._credentials[plan.uid] = credential_hash(credential) if credential else ""
            del token
            checkpoint("issue:token")  # the token exists only in this process
            expires = st.rfc3339(decision.expires_at)
            make(
                SECRET,
                objects.token_secret(
                    task, plan.secret, owners, plan.service_account, expires, encoded
                ),
            )
            del encoded
            checkpoint("issue:secret")

        def access(g: NamespaceGrant) -> None:
            make(ROLE, objects.role(task, g.namespace, g.role, g.rules))
            checkpoint("issue:role")
            make(
                ROLE_BINDING,
                objects.role_binding(task, g.namespace, g.binding, ns, plan.service_account),
            )
            checkpoint("issue:rolebinding")

        def reader() -> None:
            make(ROLE, objects.token_reader_role(task, plan.reader, plan.secret))
            make(ROLE_BINDING, objects.token_reader_binding(task, plan.reader, plan.spec.agent))

        chains: list[Callable[[], None]] = [identity, reader] if with_identity else []
        chains += [functools.partial(access, g) for g in plan.grants]
        # The longest chain runs on this thread: one hand-off less per grant.
        futures = [self.io.submit(chain) for chain in chains[1:]]
        failure: BaseException | None = None
        try:
            chains[0]()
        except BaseException as exc:
            failure = exc
        for future in futures:
            try:
                future.result()
            except BaseException as exc:
                failure = failure or exc
        if failure is not None:
            if with_identity:
                self.delete_objects(replace(plan, object_uids=created))
            else:  # a later stage: only what this call made, bindings first
                made = replace(plan, object_uids=created)
                self.owned.delete_grant_part(made, made.bindings())
                self.owned.delete_grant_part(
                    made, [(ROLE, g.namespace, g.role) for g in made.grants]
                )
            raise failure
        return created

    def _grant(
        self,
        task: Mapping[str, Any],
        spec: TaskSpec,
        world: World,
        decision: Granted,
        generation: int,
        approvals: list[dict[str, Any]] | None = None,
    ) -> None:
        plan = planned_grant(task, spec)
        role = stage_name(plan.service_account, spec.stage_index)
        expires_at, task_expires = decision.expires_at, None
        if spec.staged and spec.task_ttl is not None:  # the whole task's clock starts now
            task_expires = decision.granted_at + spec.task_ttl
            expires_at = min(expires_at, task_expires)
        plan = replace(
            plan,
            grants=tuple(NamespaceGrant(g.namespace, role, role, g.rules) for g in decision.grants),
            policies=tuple(decision.policy_keys),
            expires_at=expires_at,
            granted_at=decision.granted_at,
            pod_uid=world.pod.uid if world.pod else None,
            task_expires_at=task_expires,
        )
        if spec.staged:
            plan = replace(plan, stages=first_stages(spec, plan))
        try:
            try:
                plan = replace(
                    plan, object_uids=self._create_objects(task, plan, decision, world.pod)
                )
            finally:
                plan = replace(plan, credential=self._credentials.pop(plan.uid, ""))
        except KubeError as exc:
            if exc.transient:
                # The API server throttles or fails (after the client's own retries):
                # nothing of the grant stays (rolled back, or replaced by the next
                # attempt, see Owned.create). Not a verdict: decided again shortly.
                log.warning("issuing %s failed (%s); deciding again", plan.ref, exc)
                raise
            log.warning("issuing %s failed: %s", plan.ref, exc)
            self._end_unissued(task, spec, Reason.ISSUE_FAILED, f"could not issue the grant: {exc}")
            self.metrics.issue_failed()
            return
        uid = plan.uid
        lock = self.registry.lock(uid)
        with lock:
            self.registry.add(plan)
            self.schedule_expiry(uid, expires_at)
        now = self.clock()
        new_status = self._active_status(task, plan)
        # The audit line goes first (write-ahead): a token exists now. A crash from here
        # on can repeat the line, never lose it.
        self._audit_granted(task, plan, decision, new_status["message"], approvals, now)
        if approvals:
            new_status["approvals"] = approvals
        try:
            with lock:  # a revocation racing us writes its end after this, not before
                current = self.registry.get(uid)
                if current is not None:  # perhaps clamped meanwhile (maxTTL lowered)
                    status = new_status if current is plan else self._active_status(task, current)
                    self._write_status(task, status)
        except KubeError as exc:
            # The task went away or cannot record its grant: take everything back.
            log.warning("recording the grant of %s failed (%s); revoking", plan.ref, exc)
            self.revoke(
                plan, Reason.ISSUE_FAILED, f"could not record the grant: {exc}", write_status=False
            )
            if not isinstance(exc, NotFound):
                self.ended.discard(uid)  # nothing was recorded: decide it afresh
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

    def _audit_granted(
        self,
        task: Mapping[str, Any],
        grant: LiveGrant,
        decision: Granted,
        message: str,
        approvals: list[dict[str, Any]] | None,
        now: datetime,
    ) -> None:
        """The audit line of a grant (a task's, or a staged task's stage)."""
        assert grant.expires_at is not None
        self.audit.write(
            audit.record(
                "granted",
                task,
                reason=Reason.POLICY_ALLOWED,
                phase=Phase.ACTIVE,
                message=message,
                requested=_requested(grant.spec),
                requester=_requester(grant.spec),
                granted=[g.to_status() for g in grant.grants],
                policies=_policy_refs(decision),
                objects=self._object_list(grant),
                granted_at=st.rfc3339(decision.granted_at),
                expires_at=st.rfc3339(grant.expires_at),
                now=now,
                approvals=approvals or None,
                stage=grant.spec.stage,
            )
        )

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
        # a grant adopted at start-up does not know it: kept from the status
        credential = grant.credential or (task.get("status") or {}).get("credentialHash")
        if credential:
            new_status["credentialHash"] = credential
        if grant.stage_index >= 0:
            new_status["stage"] = grant.spec.stage
            new_status["stages"] = [dict(e) for e in grant.stages]
            if grant.task_expires_at:
                new_status["taskExpiresAt"] = st.rfc3339(grant.task_expires_at)
        return new_status

    @staticmethod
    def _object_list(grant: LiveGrant) -> list[dict[str, str]]:
        return [{"kind": k, "namespace": ns, "name": n} for k, ns, n in grant.objects()]
