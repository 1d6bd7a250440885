"""The watch-fed cache's logic: list, events, relist after a gap, hostile objects;
and the registry's indexes. The API is a scripted stand-in (pure logic only)."""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import UTC, datetime

from agent_access.engine import parse_task
from agent_access.informers import SKIP, Informer
from agent_access.kube import PODS, Gone, KubeError
from agent_access.runtime import NamespaceGrant, Registry, planned_grant


def obj(ns, name, rv, **extra):
    return {"metadata": {"namespace": ns, "name": name, "resourceVersion": str(rv)}, **extra}


class ScriptedKube:
    """list_all returns the next listing; watch yields the next script (or raises)."""

    def __init__(self, listings, watches):
        self.listings = list(listings)
        self.watches = list(watches)
        self.lists = 0
        self.watched_from: list[str] = []
        self.done = threading.Event()

    def pages(self, resource, namespace=None, version=None):
        self.lists += 1
        items, version[0] = self.listings.pop(0)
        yield items[:1]  # in two pages
        yield items[1:]

    def watch(self, resource, version, timeout=300, namespace=None):
        self.watched_from.append(version)
        if not self.watches:
            self.done.set()
            raise KubeError(0, "no more scripts")
        script = self.watches.pop(0)
        if isinstance(script, Exception):
            raise script
        yield "OPEN", {}
        yield from script


def run(informer, kube):
    informer.start()
    assert kube.done.wait(5)
    informer.stop()


def test_list_then_events_are_reported_after_the_first_listing_only():
    seen = []
    kube = ScriptedKube(
        [([obj("a", "p1", 1, v=1)], "10")],
        [
            [
                ("ADDED", obj("a", "p2", 11, v=2)),
                ("MODIFIED", obj("a", "p1", 12, v=3)),
                ("BOOKMARK", {"metadata": {"resourceVersion": "20"}}),
                ("DELETED", obj("a", "p2", 21, v=2)),
            ]
        ],
    )
    inf = Informer(kube, PODS, lambda o: o["v"], lambda *e: seen.append(e), by_namespace=True)
    run(inf, kube)
    assert seen == [
        ("ADDED", ("a", "p2"), None, 2),
        ("MODIFIED", ("a", "p1"), 1, 3),
        ("DELETED", ("a", "p2"), 2, None),
    ]
    assert inf.items == {("a", "p1"): 3}
    assert inf.in_namespace("a") == [3] and inf.in_namespace("b") == []
    assert kube.watched_from == ["10", "21"]  # resumed from the last version seen
    assert inf.synced.is_set()


def test_a_gap_relists_and_reports_every_difference():
    seen = []
    kube = ScriptedKube(
        [
            ([obj("a", "keep", 1, v=1), obj("a", "gone", 2, v=1), obj("a", "same", 3, v=1)], "5"),
            ([obj("a", "keep", 7, v=2), obj("a", "new", 8, v=1), obj("a", "same", 3, v=1)], "9"),
        ],
        [Gone(410, "too old")],
    )
    inf = Informer(kube, PODS, lambda o: o["v"], lambda *e: seen.append(e))
    run(inf, kube)
    assert sorted(seen) == [
        ("ADDED", ("a", "new"), None, 1),
        ("DELETED", ("a", "gone"), 1, None),
        ("MODIFIED", ("a", "keep"), 1, 2),
    ]
    assert kube.lists == 2 and inf.relists == 2


def test_whole_objects_first_list_included_and_a_gap_deletion_as_a_stub():
    """The AgentTask watch needs whole objects: every one of the first list, every
    event, and for a deletion seen only by a relist, a stub built from the key."""
    seen = []
    kube = ScriptedKube(
        [
            ([obj("a", "t1", 1, v="u1"), obj("a", "t2", 2, v="u2")], "5"),
            ([obj("a", "t1", 1, v="u1")], "9"),
        ],
        [[("MODIFIED", obj("a", "t1", 6, v="u1"))], Gone(410, "too old")],
    )
    inf = Informer(
        kube,
        PODS,
        lambda o: (o["v"], o["metadata"]["resourceVersion"]),
        on_object=lambda kind, o: seen.append((kind, o["metadata"]["name"], o.get("v"))),
        stub=lambda key, value: {"metadata": {"namespace": key[0], "name": key[1]}},
    )
    run(inf, kube)
    assert seen == [
        ("ADDED", "t1", "u1"),
        ("ADDED", "t2", "u2"),
        ("MODIFIED", "t1", "u1"),
        # the relist: t1 went back to version 1 (changed), t2 is gone
        ("DELETED", "t2", None),
        ("MODIFIED", "t1", "u1"),
    ]


def test_a_broken_connection_resumes_without_relisting():
    kube = ScriptedKube([([], "5")], [KubeError(0, "reset"), [("ADDED", obj("a", "x", 6, v=1))]])
    inf = Informer(kube, PODS, lambda o: o["v"])
    run(inf, kube)
    assert kube.lists == 1 and kube.watched_from[:2] == ["5", "5"]
    assert inf.items == {("a", "x"): 1}


def test_hostile_objects_are_skipped_never_fatal():
    seen = []

    def transform(o):
        if o.get("bad"):
            raise ValueError("hostile")
        return SKIP if o.get("skip") else o["v"]

    kube = ScriptedKube(
        [([obj("a", "ok", 1, v=1), obj("a", "bad", 2, bad=True)], "5")],
        [[("ADDED", obj("a", "s", 6, skip=True)), ("MODIFIED", obj("a", "ok", 7, bad=True))]],
    )
    inf = Informer(kube, PODS, transform, lambda *e: seen.append(e))
    run(inf, kube)
    # a valid object turned invalid is reported as gone (its grants are re-checked)
    assert ("MODIFIED", ("a", "ok"), 1, None) in seen
    assert inf.items == {}


def test_the_registry_indexes_follow_every_change():
    task = {
        "apiVersion": "agentaccess.io/v1alpha1",
        "kind": "AgentTask",
        "metadata": {"name": "t", "namespace": "agents", "uid": "u1"},
        "spec": {
            "agent": "bot",
            "intent": "x",
            "podName": "p",
            "access": [
                {
                    "namespace": "tgt",
                    "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}],
                }
            ],
        },
    }
    plan = planned_grant(task, parse_task(task))
    reg = Registry()
    reg.add(plan)
    assert reg.has_pod("agents", "p") and reg.has_agent("agents", "bot")
    assert [g.uid for g in reg.for_target(["tgt"])] == ["u1"]
    moved = replace(plan, grants=(NamespaceGrant("other", "r", "b", ()),))
    reg.add(moved)  # replaced: the old target no longer finds it
    assert reg.for_target(["tgt"]) == [] and [g.uid for g in reg.for_target(["other"])] == ["u1"]
    assert reg.remove("u1") is moved
    assert not reg.has_pod("agents", "p") and reg.for_agent("agents", "bot") == []
    assert reg.for_target(None) == [] and datetime.now(UTC)
