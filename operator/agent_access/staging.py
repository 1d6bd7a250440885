"""Staged tasks, the service side: moving from one stage to the next.

A staged task's per-task identity (ServiceAccount, token Secret) lives from its
first stage to its end; each stage has its own Role and RoleBinding per target
namespace (named <identity>-s<n>). Moving `spec.stage` forward:

1. the live stage's RoleBindings are deleted (its access is refused: 403), then
   its Roles; the registry now holds the identity with no access, so every
   revocation trigger (cancel, delete, pod end, suspension, the task's TTL) still
   ends the task meanwhile;
2. the new stage is decided as a fresh decision (policies, guardrails, conditions,
   approval where a policy requires it, counted for this stage);
3. its Roles and RoleBindings are created for the same identity, then recorded.

A denied stage ends the task (`Denied`, the stage's reason) and removes the
identity. A crash anywhere in between leaves no access of either stage: at start-up
the identity is adopted, any stage objects that are not the current stage's are
deleted, and a stage whose objects are incomplete is decided and issued again.

A mixin of the grant service (service.py), like issuance.py.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from . import audit, stages
from . import status as st
from .approvals import Awaiting
from .engine import Denied, Granted, SpecError, TaskSpec, evaluate, parse_task
from .faults import checkpoint
from .issuance import Issuance, _stub
from .kube import SERVICE_ACCOUNTS, KubeError
from .model import (
    ANNOTATION_EXPIRES_AT,
    ANNOTATION_GRANTED_AT,
    ANNOTATION_POLICIES,
    ANNOTATION_PRESET_RULES,
    ANNOTATION_STAGE,
    Phase,
    Reason,
)
from .objects import stage_name
from .runtime import ROLE, LiveGrant, NamespaceGrant

log = logging.getLogger(__name__)

STAGE_STEPS = ("advance:rolebindings", "advance:roles", "stage:objects", "stage:status")


def stage_moved(task: Mapping[str, Any], grant: LiveGrant) -> bool:
    """Does this staged grant need stage work: `spec.stage` moved on, or its current
    stage is not issued yet (being decided, waiting for approval, after a restart)?
    In memory, no I/O."""
    if grant.stage_index < 0:
        return False
    spec = task.get("spec") or {}
    names = [s.get("name") for s in spec.get("stages") or () if isinstance(s, Mapping)]
    wanted = spec.get("stage") or (names[0] if names else None)
    return not grant.stage_live or wanted != grant.spec.stage


class Staging(Issuance, Awaiting):
    """Stage transitions, on top of issuance and approval. Expects the attributes and
    methods of `service.Service`."""

    def stage_work(self, task: Mapping[str, Any], grant: LiveGrant) -> None:
        try:
            spec = parse_task(task)
        except SpecError as exc:
            self.revoke(grant, Reason.INVALID_SPEC, f"spec: {exc}", phase=Phase.DENIED)
            return
        if not spec.staged:
            return
        if spec.stage_index < grant.stage_index:  # admission refuses it; never go back
            log.warning("%s: spec.stage moved back to %s; ignored", grant.ref, spec.stage)
            return
        if grant.uid in self._ending:
            return  # on its way out
        if spec.stage_index > grant.stage_index:
            self.leave_stage(grant, spec)
        live = self.registry.get(grant.uid)
        if live is not None and live.leftovers:
            live = self._clear_leftovers(live)  # raises on an API error: retried
        if live is not None and not live.stage_live:
            self.enter_stage(task, live, spec)

    def _clear_leftovers(self, grant: LiveGrant) -> LiveGrant | None:
        """Objects of other stages a start-up could not delete: gone before any stage is
        issued again (bindings first)."""
        with self.registry.lock(grant.uid):
            live = self.registry.get(grant.uid)
            if live is None:
                return None
            self.owned.delete_grant_part(live, live.leftover_bindings())
            self.owned.delete_grant_part(live, live.leftover_roles())
            live = replace(
                live,
                leftovers=(),
                object_uids={k: v for k, v in live.object_uids.items() if k not in live.leftovers},
            )
            self.registry.add(live)
            return live

    def leave_stage(self, grant: LiveGrant, spec: TaskSpec) -> None:
        """The live stage's access goes first (403), then its Roles; the identity stays."""
        triggered = self.clock()
        with self.registry.lock(grant.uid):
            live = self.registry.get(grant.uid)
            if live is None or live.stage_index >= spec.stage_index:
                return
            bindings, roles = live.bindings(), [(ROLE, g.namespace, g.role) for g in live.grants]
            self.owned.delete_grant_part(live, bindings)
            refused = self.clock()
            checkpoint("advance:rolebindings")
            self.owned.delete_grant_part(live, roles)
            checkpoint("advance:roles")
            now = self.clock()
            history = stages.leave(
                live.stages, spec.stages, live.stage_index, spec.stage_index, now
            )
            gone = set(bindings) | set(roles)
            live = replace(
                live,
                spec=spec,
                grants=(),
                policies=(),
                stage_index=spec.stage_index,
                stage_live=False,
                stages=history,
                granted_at=None,
                expires_at=live.task_expires_at or live.expires_at,
                object_uids={k: v for k, v in live.object_uids.items() if k not in gone},
            )
            self.registry.add(live)
            if live.expires_at:
                self.schedule_expiry(live.uid, live.expires_at)
        self.metrics.stage_left((refused - triggered).total_seconds())
        previous = grant.spec.stage
        message = f"stage {previous} left for {spec.stage}: its access is removed"
        self._write_stage_status(
            live,
            {
                "phase": Phase.PENDING.value,
                "reason": "StageAdvancing",
                "message": f"deciding stage {spec.stage} ({previous} left)",
                "stage": spec.stage,
                "stages": [dict(e) for e in history],
                "grants": [],
                "approvals": [],
                "policies": [],
                "expiresAt": st.rfc3339(live.expires_at) if live.expires_at else None,
            },
        )
        self.audit.write(
            audit.record(
                "stage",
                _stub_of(live),
                reason="StageAdvanced",
                phase=Phase.ACTIVE,
                message=message,
                requester=spec.requester.to_dict() if spec.requester else None,
                granted=[g.to_status() for g in grant.grants],
                now=now,
                stage=previous,
            )
        )
        self._event(_stub_of(live), "Normal", "StageAdvanced", message, "Advance", spec)

    def _write_stage_status(self, grant: LiveGrant, fields: Mapping[str, Any]) -> None:
        """A few status fields of a staged task, only while it is live here (a revocation
        racing this writes the end after, never before); API errors tried thrice."""
        for attempt in range(3):
            try:
                with self.registry.lock(grant.uid):
                    if self.registry.get(grant.uid) is None:
                        return
                    self._write_status(_stub_of(grant), fields, partial=True)
                return
            except KubeError as exc:
                log.warning("recording the stage of %s failed: %s", grant.ref, exc)
                time.sleep(0.2 * (attempt + 1))

    def enter_stage(self, task: Mapping[str, Any], grant: LiveGrant, spec: TaskSpec) -> None:
        """Decide the current stage afresh and, if allowed (and approved), issue it."""
        if grant.task_expires_at and grant.task_expires_at <= self.clock():
            return  # the task's deadline ends it (already scheduled)
        generation = self.registry.generation
        world, watched = self.facts.world(spec)
        decision = self.cpu.submit(evaluate, spec, world, self.clock(), self.guardrails).result()
        if isinstance(decision, Denied) and watched:  # never deny on watched facts
            world = self.facts.world_from_api(spec)
            again = self.cpu.submit(evaluate, spec, world, self.clock(), self.guardrails)
            decision = again.result()
        if isinstance(decision, Denied):
            decision = self.explainer.explain(decision, spec.requester)
            self.revoke(
                grant,
                decision.reason,
                f"stage {spec.stage}: {decision.message}",
                detail=decision.detail,
                phase=Phase.DENIED,
            )
            self.metrics.denied(decision.reason)
            return
        spec = decision.spec or spec
        since = stages.parse_started(stages.started_at(grant.stages, spec.stage)) or self.clock()

        def end(phase: Phase, reason: Reason, message: str, detail: str, extra: Any) -> None:
            self.revoke(grant, reason, f"stage {spec.stage}: {message}", detail=detail, phase=phase)

        approvals = self.gate(task, spec, decision, since=since, end=end)
        if approvals is None:
            return
        limited = self.limits.reserve(grant.uid, spec, decision.policies)
        if limited:
            self.revoke(
                grant, limited.reason, f"stage {spec.stage}: {limited.message}",
                detail=limited.detail, phase=Phase.DENIED,
            )  # fmt: skip
            return
        try:
            self._issue_stage(task, grant, spec, decision, approvals, generation)
        finally:
            self.limits.release(grant.uid)

    def _issue_stage(
        self,
        task: Mapping[str, Any],
        grant: LiveGrant,
        spec: TaskSpec,
        decision: Granted,
        approvals: list[dict[str, Any]],
        generation: int,
    ) -> None:
        role = stage_name(grant.service_account, spec.stage_index)
        plan = replace(
            grant,
            spec=spec,
            grants=tuple(NamespaceGrant(g.namespace, role, role, g.rules) for g in decision.grants),
        )
        try:
            created = self._create_objects(task, plan, decision, None, with_identity=False)
        except KubeError as exc:
            if exc.transient:
                raise  # decided again shortly (nothing of the stage stays)
            self.revoke(
                grant,
                Reason.ISSUE_FAILED,
                f"stage {spec.stage}: could not issue its access: {exc}",
            )
            self.metrics.issue_failed()
            return
        checkpoint("stage:objects")
        uid = grant.uid
        with self.registry.lock(uid):
            live = self.registry.get(uid)
            if live is None or live.stage_index != spec.stage_index:  # ended meanwhile
                made = replace(plan, object_uids=created)
                self.owned.delete_grant_part(made, made.bindings())
                self.owned.delete_grant_part(
                    made, [(ROLE, g.namespace, g.role) for g in made.grants]
                )
                return
            expires = decision.expires_at
            if live.task_expires_at:
                expires = min(expires, live.task_expires_at)
            live = replace(
                live,
                spec=spec,
                grants=plan.grants,
                policies=tuple(decision.policy_keys),
                expires_at=expires,
                granted_at=decision.granted_at,
                object_uids={**live.object_uids, **created},
                stage_live=True,
            )
            live = replace(live, stages=stages.enter(live.stages, live))
            self.registry.add(live)
            self.schedule_expiry(uid, expires)
        self._record_stage(live)
        now = self.clock()
        status = self._active_status(task, live)
        status["message"] = f"stage {spec.stage}: {status['message']}"
        if approvals:
            status["approvals"] = approvals
        self._audit_granted(task, live, decision, status["message"], approvals, now)
        self._write_stage_status(live, status)  # the grant stands even if this fails
        checkpoint("stage:status")
        self._event(task, "Normal", "StageGranted", status["message"], "Grant", spec)
        if self.registry.generation != generation:
            self._recheck_soon(uid)

    def _record_stage(self, grant: LiveGrant) -> None:
        """The identity's record (what a restart reads): the stage and its deadline."""
        assert grant.expires_at and grant.granted_at
        presets = {
            g.namespace: [r.to_dict() for r in g.rules] for g in grant.spec.access if g.preset
        }
        record: dict[str, str | None] = {
            ANNOTATION_EXPIRES_AT: st.rfc3339(grant.expires_at),
            ANNOTATION_GRANTED_AT: st.rfc3339(grant.granted_at),
            ANNOTATION_POLICIES: ",".join(grant.policies),
            ANNOTATION_STAGE: grant.spec.stage or "",
            # what this stage's presets granted (none: the previous stage's record goes)
            ANNOTATION_PRESET_RULES: json.dumps(presets, separators=(",", ":"))
            if presets
            else None,
        }
        try:
            self.kube.merge_patch(
                SERVICE_ACCOUNTS,
                grant.namespace,
                grant.service_account,
                {"metadata": {"annotations": record}},
            )
        except KubeError as exc:  # a restart then takes the earlier deadline: safe
            log.warning("could not record stage %s of %s: %s", grant.spec.stage, grant.ref, exc)


def _stub_of(grant: LiveGrant) -> dict[str, Any]:
    return _stub(grant)
