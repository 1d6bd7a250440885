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
is removed with a conditional JSON patch (tested resourceVersion), never by
rewriting whatever list someone else left.
"""

from __future__ import annotations

import contextlib
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
        #: uid -> (body, next retry delay) of tasks whose handling failed.
        self._failed: dict[str, tuple[Mapping[str, Any], float]] = {}
        #: Deleted tasks whose revocation is done but whose finalizer is not yet removed.
        self._revoked: set[str] = set()
        self._retries = Deadlines(self._retry)

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
        if not uid:
            return
        if kind != "DELETED":
            self.svc.note_seen(obj)
            if not self._needs_work(obj):
                return
        self._submit(str(uid), kind, obj)

    def _needs_work(self, obj: Mapping[str, Any]) -> bool:
        meta = obj["metadata"]
        finalizers = meta.get("finalizers") or ()
        if meta.get("deletionTimestamp"):
            return FINALIZER in finalizers  # otherwise: the DELETED event will say
        if FINALIZER not in finalizers:
            return True
        return self.svc.has_work(obj) or self.svc.status_forged(obj)

    def _submit(self, uid: str, kind: str, obj: Mapping[str, Any]) -> None:
        with self._lock:
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
            kind, obj = item
            try:
                self._handle(kind, obj)
            except KubeError as exc:  # the API is struggling: again soon, not in a minute
                meta = obj["metadata"]
                log.warning(
                    "handling %s/%s failed, retrying: %s",
                    meta.get("namespace"),
                    meta.get("name"),
                    exc,
                )
                self._retry_later(uid, obj)
            except Exception:
                meta = obj["metadata"]
                log.exception("handling %s/%s failed", meta.get("namespace"), meta.get("name"))
            else:
                with self._lock:
                    self._failed.pop(uid, None)

    def _handle(self, kind: str, obj: Mapping[str, Any]) -> None:
        svc = self.svc
        meta = obj["metadata"]
        uid = str(meta["uid"])
        if kind == "DELETED":  # also when someone else removed the finalizer
            svc.on_task_gone(obj)
            svc.forget(uid)
            with self._lock:
                self._revoked.discard(uid)
                self._failed.pop(uid, None)
            return
        if meta.get("deletionTimestamp"):
            if FINALIZER not in (meta.get("finalizers") or ()):
                return
            if uid not in self._revoked:
                with svc.metrics.timed("delete"):
                    svc.on_task_deleted(obj)
                self._revoked.add(uid)
            self._release(obj)
            return
        if FINALIZER not in (meta.get("finalizers") or ()):
            self._hold(obj)
        svc.restore_forged_status(obj)
        if svc.has_work(obj):
            with svc.metrics.timed("reconcile"):
                svc.reconcile(obj)

    def _hold(self, obj: Mapping[str, Any]) -> None:
        """Add the finalizer (admission did not): only to the very version handled."""
        meta = obj["metadata"]
        patch: list[dict[str, Any]] = [
            {"op": "test", "path": "/metadata/uid", "value": meta["uid"]},
            {"op": "test", "path": "/metadata/resourceVersion", "value": meta["resourceVersion"]},
        ]
        if meta.get("finalizers"):
            patch.append({"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER})
        else:
            patch.append({"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]})
        with contextlib.suppress(NotFound):
            self.svc.kube.json_patch(AGENT_TASKS, meta["namespace"], meta["name"], patch)

    def _release(self, obj: Mapping[str, Any]) -> None:
        """Remove our finalizer, and only it, from the version handled."""
        meta = obj["metadata"]
        index = list(meta.get("finalizers") or ()).index(FINALIZER)
        patch = [
            {"op": "test", "path": "/metadata/uid", "value": meta["uid"]},
            {"op": "test", "path": f"/metadata/finalizers/{index}", "value": FINALIZER},
            {"op": "remove", "path": f"/metadata/finalizers/{index}"},
        ]
        with contextlib.suppress(NotFound):
            self.svc.kube.json_patch(AGENT_TASKS, meta["namespace"], meta["name"], patch)

    # -- retries ----------------------------------------------------------------------

    def _retry_later(self, uid: str, obj: Mapping[str, Any]) -> None:
        with self._lock:
            delay = self._failed[uid][1] if uid in self._failed else RETRY_FIRST
            self._failed[uid] = (obj, min(delay * 2, RETRY_MAX))
        self._retries.schedule(uid, datetime.now(UTC) + timedelta(seconds=delay))

    def _retry(self, uid: str) -> None:
        """Handle a failed task again (on the timer thread: no I/O). A newer version
        the watch delivered meanwhile was handled, or is queued, already; a deletion
        ends the retries."""
        with self._lock:
            found = self._failed.get(uid)
            if found is None or uid in self._latest:
                return
        self._submit(uid, "MODIFIED", found[0])
