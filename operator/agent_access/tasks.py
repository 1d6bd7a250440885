"""AgentTasks, watched by the operator itself and handed to the grant service.

An `Informer` per watched namespace (or one for all) follows AgentTasks and keeps
only (UID, resourceVersion) per task. Each event that may need work goes to a
per-task queue: one task's events are handled one at a time and in order, the
latest body replacing any not yet handled (work is level-based: the service
looks at the task as it is now); different tasks are handled in parallel on the
service's threads, new tasks on the decision threads, everything else on the
revocation threads. Events that need nothing (the status writes of a live or
ended grant, most of all) are dropped on the watch thread, in a dict lookup.

Why not kopf: it ran every AgentTask event through its machinery on one event
loop (about 3 ms of CPU each, three events per grant), in front of everything
else; docs/benchmarks.md has the before/after numbers.

The finalizer `agentaccess.io/revoke` (added at admission, or here if the
admission policies are off) holds a deleted task until its grant is revoked; it
is removed with a conditional JSON patch (tested UID and value), never by
rewriting whatever list someone else left. A task being deleted is revoked
whatever its finalizers say, and once a task was seen being deleted no older
version of it is ever handled again.

A handling that fails (an API error, or anything else) is retried after 0.5 s,
doubling to 10 s, with the task as the API server has it then, and only if no
newer event of the task arrived meanwhile (that one was, or will be, handled).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from .informers import Informer, Key
from .kube import AGENT_TASKS, KubeError, NotFound
from .model import FINALIZER
from .runtime import Deadlines
from .service import Service

log = logging.getLogger(__name__)

#: First and longest wait before retrying a task whose handling failed on an API error.
RETRY_FIRST = 0.5
RETRY_MAX = 10.0

TaskValue = tuple[str, str]  # (uid, resourceVersion)


def _value(obj: Mapping[str, Any]) -> TaskValue:
    meta = obj["metadata"]
    return str(meta["uid"]), str(meta.get("resourceVersion") or "")


def _stub(key: Key, value: TaskValue) -> dict[str, Any]:
    """A task deleted while the watch was down: all a relist knows of it."""
    return {"metadata": {"namespace": key[0], "name": key[1], "uid": value[0]}}


class _NotYet(Exception):
    """The handling must be repeated later (e.g. a revocation is still retrying)."""


class TaskWatch:
    def __init__(self, service: Service, namespaces: Sequence[str | None] | None = None):
        self.svc = service
        self.informers: list[Informer[TaskValue]] = [
            Informer(
                service.kube,
                AGENT_TASKS,
                _value,
                name=f"agenttasks/{ns}" if ns else "agenttasks",
                namespace=ns,
                on_object=self._event,
                stub=_stub,
            )
            for ns in ([*namespaces] if namespaces else [None])
        ]
        self._lock = threading.Lock()
        #: uid -> (event type, newest body) not yet handled.
        self._latest: dict[str, tuple[str, Mapping[str, Any]]] = {}
        #: uids being handled by a thread right now.
        self._busy: set[str] = set()
        #: uid -> number of its newest event, from one counter for all (so a number is
        #: never reused): tells whether a retry is stale.
        self._seq: dict[str, int] = {}
        self._counter = itertools.count(1)
        #: (namespace, name) -> the uid of the task that holds the name.
        self._uid_at: dict[Key, str] = {}
        #: uids seen being deleted: no version without deletionTimestamp is handled after.
        self._deleting: set[str] = set()
        #: uid -> (namespace, name, next retry delay, events received at the failure).
        self._failed: dict[str, tuple[str, str, float, int]] = {}
        #: Deleted tasks whose deletion was handled (audit line, Event, revocation asked).
        self._delete_handled: set[str] = set()
        #: Deleted tasks whose revocation is done but whose finalizer is not yet removed.
        self._revoked: set[str] = set()
        #: Tasks whose handling failed with something other than an API error, logged
        #: in full once.
        self._logged: set[str] = set()
        self._retries = Deadlines(self._retry)
        service.waiting.wake = self.wake

    # -- running --------------------------------------------------------------------

    def start(self) -> None:
        for informer in self.informers:
            informer.start()

    def wait_synced(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        return all(i.synced.wait(max(0.0, deadline - time.monotonic())) for i in self.informers)

    def stop(self) -> None:
        for informer in self.informers:
            informer.stop()
        self._retries.stop()

    def pending(self) -> int:
        with self._lock:
            return len(self._latest) + len(self._busy)

    # -- events (on a watch thread: no I/O here) --------------------------------------

    def _event(self, kind: str, obj: Mapping[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        uid = meta.get("uid")
        if not uid or not isinstance(uid, str):
            return
        key = (str(meta.get("namespace") or ""), str(meta.get("name") or ""))
        with self._lock:
            previous = self._uid_at.get(key)
            if kind == "DELETED":
                if previous == uid:
                    del self._uid_at[key]
            else:
                self._uid_at[key] = uid
        if previous and previous != uid and kind != "DELETED":
            # The name holds another task now: the one before went while the watch was
            # down (a relist reports only the name's new state). It is gone.
            self._submit(previous, "DELETED", _stub(key, (previous, "")))
        if kind != "DELETED":
            self.svc.note_seen(obj)
            if meta.get("deletionTimestamp"):
                with self._lock:
                    self._deleting.add(uid)
            if not self._needs_work(obj):
                return
        self._submit(uid, kind, obj)

    def _needs_work(self, obj: Mapping[str, Any]) -> bool:
        meta = obj["metadata"]
        uid = meta["uid"]
        finalizers = _finalizers(meta)
        if meta.get("deletionTimestamp"):
            # Ours to remove, or a live grant to end whatever the finalizers say.
            return FINALIZER in finalizers or self.svc.registry.get(uid) is not None
        if FINALIZER not in finalizers:
            return True
        return self.svc.has_work(obj) or self.svc.status_forged(obj)

    def _submit(
        self, uid: str, kind: str, obj: Mapping[str, Any], if_seq: int | None = None
    ) -> None:
        deleting = bool(obj["metadata"].get("deletionTimestamp"))
        with self._lock:
            if if_seq is not None and self._seq.get(uid, 0) != if_seq:
                return  # a newer event arrived: it was, or will be, handled
            if kind != "DELETED" and not deleting and uid in self._deleting:
                return  # an older version than one already seen being deleted
            self._seq[uid] = next(self._counter)
            self._latest[uid] = (kind, obj)
            if uid in self._busy:
                return  # the thread handling it takes this body next
            self._busy.add(uid)
        deciding = kind != "DELETED" and self.svc.needs_decision(obj)
        pool = self.svc.decisions if deciding else self.svc.pool
        try:
            pool.submit(self._work, uid)
        except RuntimeError:  # shutting down
            with self._lock:
                self._busy.discard(uid)

    # -- handling (on the service's threads) -------------------------------------------

    def _work(self, uid: str) -> None:
        while True:
            with self._lock:
                item = self._latest.pop(uid, None)
                if item is None:
                    self._busy.discard(uid)
                    return
                seq = self._seq.get(uid, 0)
            kind, obj = item
            meta = obj["metadata"]
            try:
                self._handle(kind, obj)
            except Exception as exc:  # again soon, with the task as it is then
                where = f"{meta.get('namespace')}/{meta.get('name')}"
                if isinstance(exc, (KubeError, _NotYet)) or uid in self._logged:
                    log.warning("handling %s failed, retrying: %s", where, exc)
                else:
                    self._logged.add(uid)
                    log.exception("handling %s failed, retrying", where)
                if kind != "DELETED":
                    self._retry_later(uid, meta, seq)
            else:
                with self._lock:
                    if self._failed.get(uid, ("", "", 0.0, -1))[3] <= seq:
                        self._failed.pop(uid, None)

    def _handle(self, kind: str, obj: Mapping[str, Any]) -> None:
        svc = self.svc
        meta = obj["metadata"]
        uid = str(meta["uid"])
        if kind == "DELETED":  # also when someone else removed the finalizer
            try:
                svc.on_task_gone(obj)
            finally:  # whatever happened, nothing is kept about a task that is gone
                svc.forget(uid)
                with self._lock:
                    self._revoked.discard(uid)
                    self._delete_handled.discard(uid)
                    self._logged.discard(uid)
                    self._failed.pop(uid, None)
                    self._deleting.discard(uid)
                    self._seq.pop(uid, None)
                self._retries.cancel(uid)
            return
        if meta.get("deletionTimestamp"):
            ours = FINALIZER in _finalizers(meta)
            if uid not in self._revoked:
                if uid not in self._delete_handled:  # once: one audit line, one Event
                    with svc.metrics.timed("delete"):
                        svc.on_task_deleted(obj)
                    self._delete_handled.add(uid)
                if svc.registry.get(uid) is not None:
                    # The revocation failed (its own timer retries it): keep holding
                    # the task until it is done.
                    raise _NotYet("the grant is not revoked yet")
                self._revoked.add(uid)
            if ours:
                self._release(obj)
            return
        if FINALIZER not in _finalizers(meta) and not self._hold(obj):
            return  # gone
        svc.restore_forged_status(obj)
        if svc.has_work(obj):
            with svc.metrics.timed("reconcile"):
                svc.reconcile(obj)

    def _hold(self, obj: Mapping[str, Any]) -> bool:
        """Add the finalizer (admission did not): only to the very version handled.
        False if the task is gone."""
        meta = obj["metadata"]
        patch: list[dict[str, Any]] = [
            {"op": "test", "path": "/metadata/uid", "value": meta["uid"]},
            {"op": "test", "path": "/metadata/resourceVersion", "value": meta["resourceVersion"]},
        ]
        if _finalizers(meta):
            patch.append({"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER})
        else:
            patch.append({"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]})
        try:
            self.svc.kube.json_patch(AGENT_TASKS, meta["namespace"], meta["name"], patch)
        except NotFound:
            return False
        return True

    def _release(self, obj: Mapping[str, Any]) -> None:
        """Remove our finalizer, and only it, from the version handled."""
        meta = obj["metadata"]
        index = _finalizers(meta).index(FINALIZER)
        patch = [
            {"op": "test", "path": "/metadata/uid", "value": meta["uid"]},
            {"op": "test", "path": f"/metadata/finalizers/{index}", "value": FINALIZER},
            {"op": "remove", "path": f"/metadata/finalizers/{index}"},
        ]
        with contextlib.suppress(NotFound):
            self.svc.kube.json_patch(AGENT_TASKS, meta["namespace"], meta["name"], patch)

    def wake(self, namespace: str, name: str) -> bool:
        """Handle a task again as the API server has it now (something it waits on
        changed: an approval, its timeout). False when it could not be read."""
        try:
            fresh = self.svc.kube.get(AGENT_TASKS, namespace, name)
        except KubeError:
            return False
        if fresh is not None and self._needs_work(fresh):
            self._submit(str(fresh["metadata"]["uid"]), "MODIFIED", fresh)
        return True

    # -- retries ----------------------------------------------------------------------

    def _retry_later(self, uid: str, meta: Mapping[str, Any], seq: int) -> None:
        with self._lock:
            delay = self._failed[uid][2] if uid in self._failed else RETRY_FIRST
            ns, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
            self._failed[uid] = (ns, name, min(delay * 2, RETRY_MAX), seq)
        self._retries.schedule(uid, datetime.now(UTC) + timedelta(seconds=delay))

    def _retry(self, uid: str) -> None:
        """On the timer thread: no I/O here."""
        with contextlib.suppress(RuntimeError):  # shutting down
            self.svc.pool.submit(self._refetch, uid)

    def _refetch(self, uid: str) -> None:
        try:
            self._refetch_now(uid)
        except Exception:
            log.exception("retrying task %s failed", uid)

    def _refetch_now(self, uid: str) -> None:
        """Handle a failed task again, as the API server has it now, unless a newer
        event of it arrived meanwhile (that one was, or will be, handled)."""
        with self._lock:
            found = self._failed.get(uid)
            if found is None or self._seq.get(uid, 0) != found[3]:
                return
        namespace, name, delay, seq = found
        try:
            fresh = self.svc.kube.get(AGENT_TASKS, namespace, name)
        except KubeError:
            self._retries.schedule(uid, datetime.now(UTC) + timedelta(seconds=delay))
            return
        if fresh is None or fresh["metadata"].get("uid") != uid:
            self._submit(uid, "DELETED", _stub((namespace, name), (uid, "")), if_seq=seq)
        else:
            self._submit(uid, "MODIFIED", fresh, if_seq=seq)


def _finalizers(meta: Mapping[str, Any]) -> list[str]:
    found = meta.get("finalizers")
    return [f for f in found if isinstance(f, str)] if isinstance(found, list) else []
