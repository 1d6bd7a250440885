"""Outside changes, and the grants they may end: the service side of the watches.

Watch events (pods, ServiceAccounts, policies, namespaces) are filtered here on the
informer threads (no I/O); the work goes to the service's pools. A policy or
namespace change re-evaluates the grants it may affect, coalesced (a burst of edits
costs a few passes); the grants that must end lose their bindings at once (403
everywhere first), then the rest of each revocation runs at low concurrency. A
policy that lowered its maxTTL moves deadlines earlier. Live grants under policies
with conditions are re-evaluated every CONDITIONS_PERIOD as well.

A mixin of the grant service (service.py), like issuance.py and staging.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from . import status as st
from .engine import Denied, PodFacts, Policy, TaskSpec, condition_context, reassess
from .facts import SUSPENDED, AgentFacts, Cache
from .faults import hold
from .informers import Key
from .issuance import _stub
from .kube import SERVICE_ACCOUNTS, KubeError
from .model import ANNOTATION_EXPIRES_AT, Reason
from .policy_status import PolicyStatus
from .runtime import LiveGrant, ObjectRef
from .staging import Staging

log = logging.getLogger(__name__)

#: Live grants under policies with conditions are re-evaluated at least this often (the
#: contract says 60 s): conditions on `now` change without any event.
CONDITIONS_PERIOD = 30.0
#: How soon a re-check that failed on an API error is tried again.
RETRY_DELAY = timedelta(milliseconds=500)


def all_done(futures: list[Future[None]]) -> threading.Event:
    """An event set once every one of `futures` has finished. One for a whole pass:
    each of 10,000 revocations calling `wait()` on the 10,000 futures is quadratic
    (every call takes every future's lock), and held the interpreter for minutes."""
    done = threading.Event()
    left = [len(futures)]
    lock = threading.Lock()

    def one(_: Future[None]) -> None:
        with lock:
            left[0] -= 1
            if left[0] == 0:
                done.set()

    if not futures:
        done.set()
    for future in futures:
        future.add_done_callback(one)  # at once, on this thread, if already finished
    return done


def pod_end_reason(pod: PodFacts | None, expected_uid: str | None) -> Reason | None:
    """Why a pod ends its grant (deleted, replaced, finished), or None while it runs."""
    if pod is None or pod.deleting or (expected_uid and pod.uid != expected_uid):
        return Reason.POD_DELETED
    if pod.phase == "Succeeded":
        return Reason.POD_SUCCEEDED
    if pod.phase == "Failed":
        return Reason.POD_FAILED
    return None


class Reevaluation(Staging):
    """Expects the attributes and methods of `service.Service`."""

    cache: Cache
    triggers: ThreadPoolExecutor
    cleanup: ThreadPoolExecutor
    policy_status: PolicyStatus
    _dirty: set[str]
    _dirty_all: bool
    _dirty_queued: bool
    _dirty_lock: threading.Lock
    _stopped: threading.Event
    _pending_recheck: set[str]
    _bindings_dropped: dict[str, set[ObjectRef]]
    pool: ThreadPoolExecutor

    @staticmethod
    def _pod_message(pod: str, reason: Reason) -> str:
        return {
            Reason.POD_DELETED: f"pod {pod} was deleted",
            Reason.POD_SUCCEEDED: f"pod {pod} succeeded",
            Reason.POD_FAILED: f"pod {pod} failed",
        }[reason]

    def _context(
        self, spec: TaskSpec, policies: list[Policy], now: datetime
    ) -> dict[str, Any] | None:
        """What a re-check's conditions read (None, and nothing read, without any)."""
        if not any(p.conditions for p in policies):
            return None
        agent, pod = self.facts.condition_objects(spec)
        return condition_context(spec, policies, agent, pod, now)

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
        hold("reevaluate:start")
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
        dropped = all_done([future for _, _, future in ending])
        for g, d, _ in ending:
            self._ending.add(g.uid)
            self.cleanup.submit(self._finish_revocation, g, d, triggered, dropped)

    def _finish_revocation(
        self, grant: LiveGrant, denied: Denied, triggered: datetime, dropped: threading.Event
    ) -> None:
        try:
            dropped.wait()  # _drop_bindings never raises: failures are logged, redone below
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
