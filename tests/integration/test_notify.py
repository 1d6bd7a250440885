"""Notifications against the real API server: every decision reaches each receiver as
a signed CloudEvent without the token, and a receiver that hangs delays nothing."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from agent_access import notify
from agent_access.kube import AGENT_TASK_APPROVALS, AGENT_TASKS

from .cluster import as_token, as_user, list_pods_status, poll_status, record_timing, wait_for

READ_PODS = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]
SECRET = b"a-shared-secret"


class Sink:
    """A webhook receiver on loopback: records what it gets; `hang` never answers."""

    def __init__(self, hang: bool = False):
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.release = threading.Event()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                sink.received.append((headers, body))
                if hang:
                    sink.release.wait(60)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self, subject: str) -> list[dict]:
        return [e for e in (json.loads(b) for _, b in self.received) if e.get("subject") == subject]

    def close(self):
        self.release.set()
        self.server.shutdown()


@pytest.fixture
def sinks():
    made: list[Sink] = []

    def make(hang: bool = False) -> Sink:
        made.append(Sink(hang))
        return made[-1]

    yield make
    for s in made:
        s.close()


def scene(world):
    agents, target = world.namespace("notify-agents"), world.namespace("notify-target")
    world.service_account(agents, "bot")
    world.policy(target, "read", [(agents, "bot")], READ_PODS)
    return agents, target


def test_each_decision_reaches_the_receiver_signed_and_without_the_token(
    world, solo, sinks, tmp_path
):
    sink = sinks()
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET + b"\n")
    solo(args=["--notify-url", sink.url, "--notify-secret-file", str(secret)])
    agents, target = scene(world)
    world.task(agents, "granted", "bot", [{"namespace": target, "rules": READ_PODS}])
    task = world.wait_phase(agents, "granted", "Active")
    token = world.token(task)
    world.kube.merge_patch(AGENT_TASKS, agents, "granted", {"spec": {"cancel": True}})
    world.wait_phase(agents, "granted", "Cancelled")
    world.task(agents, "refused", "bot", [{"namespace": agents, "rules": READ_PODS}])
    world.wait_phase(agents, "refused", "Denied")
    # human approval: waiting, approved, granted
    gated = world.namespace("notify-gated")
    approval = {"required": 1, "approvers": [{"kind": "User", "name": "alice"}]}
    world.policy(gated, "gated", [(agents, "bot")], READ_PODS, approval=approval)
    allow_approvals(world, agents, "alice")
    waiting = world.task(agents, "waits", "bot", [{"namespace": gated, "rules": READ_PODS}])
    world.wait_phase(agents, "waits", "Pending")
    as_user(world.kubeconfig, "alice").create(
        AGENT_TASK_APPROVALS,
        agents,
        {
            "apiVersion": "agentaccess.io/v1alpha1",
            "kind": "AgentTaskApproval",
            "metadata": {"name": "ok"},
            "spec": {"taskName": "waits", "taskUID": waiting["metadata"]["uid"],
                     "decision": "Approve", "comment": "fine"},
        },
    )  # fmt: skip
    approved = world.wait_phase(agents, "waits", "Active")
    world.token(approved)
    wait_for(
        lambda: (
            len(sink.events(f"{agents}/granted")) == 2
            and sink.events(f"{agents}/refused")
            and len(sink.events(f"{agents}/waits")) == 3
        ),
        10,
        what="six notifications",
    )
    types = [e["type"] for e in sink.events(f"{agents}/waits")]
    assert types == [
        "io.agentaccess.task.pending",
        "io.agentaccess.task.approved",
        "io.agentaccess.task.granted",
    ], types
    assert sink.events(f"{agents}/waits")[1]["data"]["approval"]["approver"]["username"] == "alice"
    types = [e["type"] for e in sink.events(f"{agents}/granted")]
    assert types == ["io.agentaccess.task.granted", "io.agentaccess.task.cancelled"]
    denied = sink.events(f"{agents}/refused")[0]
    assert denied["type"] == "io.agentaccess.task.denied"
    assert denied["data"]["reason"] == "NoMatchingPolicy"
    granted = sink.events(f"{agents}/granted")[0]
    assert granted["specversion"] == "1.0" and granted["source"] == notify.SOURCE
    assert granted["data"]["task"]["uid"] == task["metadata"]["uid"]
    assert granted["data"]["agent"] == "bot" and granted["data"]["expiresAt"]
    assert granted["data"]["requester"]["username"] == "admin"
    for headers, body in sink.received:
        assert headers["content-type"] == "application/cloudevents+json"
        signature = headers[notify.SIGNATURE_HEADER.lower()]
        assert notify.verify(SECRET, body, signature, time.time())
        assert token not in body.decode()
        assert task["status"]["tokenSecretName"] not in body.decode()
        assert approved["status"]["tokenSecretName"] not in body.decode()


def allow_approvals(world, ns: str, user: str) -> None:
    world.allow(ns, "approver", [user], ["agenttaskapprovals"], ["create"])


def test_a_receiver_that_hangs_delays_no_grant_no_revocation_and_no_other_receiver(
    world, solo, sinks
):
    """The hung receiver holds the first event; every later decision still takes its
    usual time. (Audit lines, and so notifications, are written before a grant's status
    and after a revocation's bindings: a notifier that blocked would hold up the second
    task's Active and its Cancelled status for the receiver's whole hang.)"""
    hung, good = sinks(hang=True), sinks()
    solo(args=["--notify-url", hung.url, "--notify-url", good.url])
    agents, target = scene(world)
    world.task(agents, "first", "bot", [{"namespace": target, "rules": READ_PODS}])
    world.wait_phase(agents, "first", "Active")
    wait_for(lambda: hung.received, 5, what="the hung receiver holds the first event")
    started = time.monotonic()
    world.task(agents, "t", "bot", [{"namespace": target, "rules": READ_PODS}])
    task = world.wait_phase(agents, "t", "Active", 5)
    granted = time.monotonic() - started
    client = as_token(world.kubeconfig, world.token(task))
    assert list_pods_status(client, target) == 200
    started = time.monotonic()
    world.kube.merge_patch(AGENT_TASKS, agents, "t", {"spec": {"cancel": True}})
    poll_status(lambda: list_pods_status(client, target), {401, 403}, 2.0)
    revoked = time.monotonic() - started
    world.wait_phase(agents, "t", "Cancelled", 5)
    recorded = time.monotonic() - started
    record_timing("grant with a hung notification receiver", granted)
    record_timing("cancel -> 403 with a hung notification receiver", revoked)
    record_timing("cancel -> Cancelled status with a hung receiver", recorded)
    assert granted < 3 and revoked < 1 and recorded < 3, (granted, revoked, recorded)
    # the good receiver is not held up behind the hung one
    wait_for(
        lambda: (
            [e["type"] for e in good.events(f"{agents}/t")]
            == ["io.agentaccess.task.granted", "io.agentaccess.task.cancelled"]
        ),
        5,
        what="the other receiver got both events",
    )
