"""The AgentTask watch's ordering rules, with the grant service's real state and the API
replaced by a stand-in (pure logic only; the integration tests attack the same rules
through a real API server)."""

from __future__ import annotations

import io
import threading
import time
from typing import Any
from unittest import mock

from agent_access.audit import AuditLog
from agent_access.kube import KubeError
from agent_access.metrics import Metrics
from agent_access.model import FINALIZER
from agent_access.service import Service
from agent_access.tasks import TaskWatch

SPEC = {"agent": "a", "intent": "x", "access": []}


def body(uid: str, rv: str, name: str = "t", deleting: bool = False, finalizers=None):
    meta: dict[str, Any] = {
        "namespace": "ns",
        "name": name,
        "uid": uid,
        "resourceVersion": rv,
        "finalizers": [FINALIZER] if finalizers is None else finalizers,
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "spec": SPEC}


def service() -> tuple[Service, list]:
    calls: list = []
    kube = mock.MagicMock()
    kube.json_patch.side_effect = lambda *a, **k: calls.append(("json_patch", a[3])) or {}
    svc = Service(kube, AuditLog(stream=io.StringIO()), Metrics(), workers=4)
    svc._event = lambda *a, **k: None  # type: ignore[method-assign]
    svc.delete_objects = lambda g: None  # type: ignore[method-assign]
    return svc, calls


def settle(watch: TaskWatch, seconds: float = 3.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and watch.pending():
        time.sleep(0.01)


def test_a_stale_retry_never_revives_a_task_seen_being_deleted():
    """A decision fails on an API error; before its retry, the task is deleted (a
    foreign finalizer keeps the object). The retry must not decide the old version."""
    svc, calls = service()
    first = threading.Event()

    def issue(task):
        calls.append(("issue", task["metadata"]["resourceVersion"]))
        if not first.is_set():
            first.set()
            raise KubeError(503, "API overloaded")

    svc.issue = issue  # type: ignore[method-assign]
    watch = TaskWatch(svc)
    try:
        watch._event("ADDED", body("u1", "1"))
        assert first.wait(2)
        watch._event(
            "MODIFIED", body("u1", "2", deleting=True, finalizers=[FINALIZER, "example.com/keep"])
        )
        time.sleep(1.5)  # past the first retry
        settle(watch)
        assert [c for c in calls if c[0] == "issue"] == [("issue", "1")]
        assert "u1" in svc.ended
        # and an older body arriving late (a relist, say) is not handled either
        watch._event("MODIFIED", body("u1", "1"))
        settle(watch)
        assert [c for c in calls if c[0] == "issue"] == [("issue", "1")]
    finally:
        watch.stop()
        svc.close()


def test_a_name_taken_by_another_task_ends_the_one_before():
    """After a watch gap the relist shows only the name's new task: the old one is
    reported gone (its grant, if live, revoked)."""
    svc, _ = service()
    gone: list[str] = []
    svc.on_task_gone = lambda task: gone.append(task["metadata"]["uid"])  # type: ignore[method-assign]
    svc.issue = lambda task: None  # type: ignore[method-assign]
    watch = TaskWatch(svc)
    try:
        watch._event("ADDED", body("old", "1"))
        watch._event("MODIFIED", body("new", "5"))
        settle(watch)
        assert gone == ["old"]
    finally:
        watch.stop()
        svc.close()


def test_a_live_grant_is_revoked_on_deletion_whatever_the_finalizers_say():
    """Our finalizer replaced by someone else's, then the task deleted: the grant still
    ends, and no finalizer of the operator is removed (it has none there)."""
    svc, calls = service()
    deleted: list[str] = []
    svc.registry.get = lambda uid: object() if uid == "u1" and not deleted else None  # type: ignore[method-assign]
    svc.on_task_deleted = lambda task: deleted.append(task["metadata"]["uid"])  # type: ignore[method-assign]
    watch = TaskWatch(svc)
    try:
        watch._event("MODIFIED", body("u1", "3", deleting=True, finalizers=["example.com/keep"]))
        settle(watch)
        assert deleted == ["u1"]
        assert not [c for c in calls if c[0] == "json_patch"]
    finally:
        watch.stop()
        svc.close()


def test_a_deletion_retried_after_a_failed_revocation_is_recorded_once():
    """The revocation of a deleted task fails (the service's own timer retries it):
    the task stays held; when the retry finds the grant gone, the finalizer is
    released, and the deletion was audited and evented once, not twice."""
    svc, calls = service()
    state = {"live": True}
    deleted: list[str] = []
    svc.registry.get = lambda uid: object() if state["live"] else None  # type: ignore[method-assign]
    svc.on_task_deleted = lambda task: deleted.append(task["metadata"]["uid"])  # type: ignore[method-assign]
    deleting = body("u1", "4", deleting=True)
    svc.kube.get.return_value = deleting
    watch = TaskWatch(svc)
    try:
        watch._event("MODIFIED", deleting)
        settle(watch)
        assert deleted == ["u1"] and not [c for c in calls if c[0] == "json_patch"]
        state["live"] = False  # the service's timer revoked it meanwhile
        time.sleep(1.0)  # past the retry (0.5 s)
        settle(watch)
        assert deleted == ["u1"]
        released = [c for c in calls if c[0] == "json_patch"]
        assert len(released) == 1 and released[0][1][-1]["op"] == "remove"
    finally:
        watch.stop()
        svc.close()
