"""Notifications: the CloudEvent of a decision, its signature, delivery that never blocks."""

from __future__ import annotations

import json
import threading
import time

from agent_access import audit, notify

TASK = {
    "metadata": {"name": "t1", "namespace": "agents", "uid": "u-1"},
    "spec": {"agent": "bot", "intent": "read logs", "access": []},
}


def record(event: str = "granted", phase: str = "Active", reason: str = "PolicyAllowed"):
    return audit.record(
        event,
        TASK,
        reason=reason,
        phase=phase,
        message="granted",
        objects=[{"kind": "Secret", "name": "aat-t1-token"}],
        requester={"username": "alice", "uid": "1", "groups": []},
        expires_at="2026-12-05T00:00:00Z",
    )


def test_a_decision_becomes_a_cloudevent_with_the_task_and_no_objects():
    ev = notify.cloudevent(record(), notify.event_type(record()))
    assert ev["specversion"] == "1.0" and ev["source"] == notify.SOURCE
    assert ev["type"] == "io.agentaccess.task.granted"
    assert ev["subject"] == "agents/t1"
    assert ev["data"]["task"] == {"name": "t1", "namespace": "agents", "uid": "u-1"}
    assert ev["data"]["requester"]["username"] == "alice"
    assert "objects" not in ev["data"] and "aat-t1-token" not in json.dumps(ev)
    assert notify.cloudevent(record(), ev["type"])["id"] != ev["id"]
    long = dict(record(), intent="x" * 70000)
    assert len(notify.cloudevent(long, ev["type"])["data"]["intent"]) == notify.TEXT_LIMIT + 1


def test_ends_are_named_by_the_phase_they_end_in():
    for event, phase, want in [
        ("denied", "Denied", "denied"),
        ("revoked", "Revoked", "revoked"),
        ("revoked", "Cancelled", "cancelled"),
        ("revoked", "Completed", "completed"),
        ("expired", "Expired", "expired"),
        ("ended", "Failed", "failed"),
    ]:
        assert notify.event_type(record(event, phase)) == f"io.agentaccess.task.{want}"
    # a task deleted without a live grant: its decision was sent when it was taken
    assert notify.event_type(record("deleted", "Denied")) is None


def test_the_signature_verifies_only_for_the_same_secret_body_and_a_recent_time():
    body, now = b'{"a":1}', time.time()
    header = notify.sign(b"s3cret", body, now)
    assert notify.verify(b"s3cret", body, header, now)
    assert not notify.verify(b"other", body, header, now)
    assert not notify.verify(b"s3cret", body + b" ", header, now)
    assert not notify.verify(b"s3cret", body, header, now + 3600)  # replayed later
    assert not notify.verify(b"s3cret", body, "garbage", now)
    assert not notify.verify(b"s3cret", body, f"t={int(now)}", now)  # no v1
    assert not notify.verify(b"s3cret", body, f"t={int(now)},v1=é", now)


def test_slack_gets_a_text_message_that_cannot_ping_or_hide_links():
    rec = dict(record(), intent="<!channel> <https://evil|Approve here> & more")
    msg = notify.slack_message(rec, "io.agentaccess.task.granted")
    assert set(msg) == {"text"} and "agents/t1" in msg["text"] and "alice" in msg["text"]
    assert "<!channel>" not in msg["text"] and "&lt;!channel&gt;" in msg["text"]
    assert "&amp; more" in msg["text"]


def test_urls_are_logged_without_their_credentials():
    assert notify._redact("https://user:pw@hooks.example:8443/T0/B1/secret") == (
        "https://hooks.example:8443/…"
    )


class Post:
    def __init__(self, answers):
        self.answers, self.calls, self.sleeps = list(answers), [], []
        self.done = threading.Event()

    def __call__(self, url, body, headers):
        self.calls.append((url, body, headers))
        answer = self.answers.pop(0) if self.answers else 200
        if not self.answers:
            self.done.set()
        if isinstance(answer, Exception):
            raise answer
        return answer


def receiver(post, secret=None):
    results = []
    r = notify.Receiver(
        "http://x/", secret, "cloudevents", results.append, post=post, sleep=post.sleeps.append
    )
    return r, results


def wait(results, n):
    end = time.monotonic() + 5
    while len(results) < n and time.monotonic() < end:
        time.sleep(0.01)


def test_failures_are_retried_with_backoff_then_delivered_and_signed():
    post = Post([503, OSError("refused"), 200])
    r, results = receiver(post, secret=b"k")
    r.put(b'{"x":1}')
    wait(results, 1)
    assert results == ["delivered"]
    assert post.sleeps == [notify.BACKOFF[0], notify.BACKOFF[1]]
    _, body, headers = post.calls[-1]
    assert headers["Content-Type"] == "application/cloudevents+json"
    assert notify.verify(b"k", body, headers[notify.SIGNATURE_HEADER], time.time())
    r.stop()


def test_a_refused_or_redirected_event_is_not_retried_and_a_dead_receiver_is_given_up():
    for answer in (400, 302):
        post = Post([answer])
        r, results = receiver(post)
        r.put(b"{}")
        wait(results, 1)
        assert results == ["failed"] and len(post.calls) == 1
        r.stop()
    post = Post([400])
    r, results = receiver(post)
    r.put(b'{"x":1}')
    wait(results, 1)
    assert results == ["failed"] and len(post.calls) == 1
    r.stop()
    post = Post([500] * (len(notify.BACKOFF) + 1))
    r, results = receiver(post)
    r.put(b'{"x":1}')
    wait(results, 1)
    assert results == ["failed"] and len(post.calls) == len(notify.BACKOFF) + 1
    r.stop()


def test_putting_never_blocks_and_a_full_queue_drops_its_oldest():
    release = threading.Event()

    def hang(url, body, headers):
        release.wait(5)
        return 200

    results = []
    r = notify.Receiver("http://x/", None, "cloudevents", results.append, post=hang)
    started = time.monotonic()
    for i in range(notify.QUEUE_LIMIT + 10):
        r.put(b"%d" % i)
    assert time.monotonic() - started < 1.0
    assert results.count("dropped") >= 9
    assert r.queue[-1] == b"%d" % (notify.QUEUE_LIMIT + 9)
    big = b"x" * (notify.QUEUE_BYTES // 3)
    for _ in range(5):
        r.put(big)
    assert r.queued_bytes <= notify.QUEUE_BYTES  # bounded by size too
    release.set()
    r.stop()


def test_the_audit_log_tells_its_listeners_and_survives_a_failing_one(capsys):
    seen = []

    def broken(entry):
        raise RuntimeError("boom")

    log = audit.AuditLog(listeners=[broken, seen.append])
    log.write({"event": "granted"})
    assert seen == [{"event": "granted"}]
    assert '"event":"granted"' in capsys.readouterr().out
