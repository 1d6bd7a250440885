"""The webhook's pure decisions (authz.py), the use lines (uses.py) and their timeline."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from agent_access.audit import render_text, summarize, timeline
from agent_access.authz import (
    Call,
    ReviewError,
    entry_of,
    identity_of,
    inactive,
    needs_recheck,
    parse_review,
    recheck_rules,
    response,
)
from agent_access.engine import SpecError, parse_policy
from agent_access.rules import Rule
from agent_access.uses import (
    AUDIT,
    AUTHORIZER,
    call_of_event,
    events_of,
    prefer_authorizer,
    used_line,
)

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC).timestamp()


def review(user="system:serviceaccount:team:aat-fix-1234abcd", **attrs):
    res = {"namespace": "team", "verb": "get", "resource": "pods", **attrs}
    return {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {"user": user, "groups": ["system:serviceaccounts"], "resourceAttributes": res},
    }


def task(phase="Active", **over):
    body = {
        "metadata": {"name": "fix", "namespace": "team", "uid": "1234abcd-0000"},
        "spec": {
            "agent": "bot",
            "intent": "fix it",
            "access": [
                {
                    "namespace": "team",
                    "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}],
                }
            ],
        },
        "status": {
            "phase": phase,
            "reason": "PolicyAllowed",
            "expiresAt": "2026-12-05T13:00:00Z",
            "policies": ["team/p"],
        },
    }
    for key, value in over.items():
        section, field = key.split("__")
        body[section][field] = value
    return body


def test_only_per_task_identities_are_calls():
    assert identity_of("system:serviceaccount:team:aat-x-1") == ("team", "aat-x-1")
    for other in ("alice", "system:serviceaccount:team:bot", "system:serviceaccount:aat-x",
                  "system:serviceaccount:a:b:aat-x"):  # fmt: skip
        assert identity_of(other) is None
    assert parse_review(review(user="alice")) == ("authorization.k8s.io/v1", None)


def test_a_review_is_read_strictly():
    version, call = parse_review(review(subresource="log", name="p1", group="apps"))
    assert version == "authorization.k8s.io/v1"
    assert call is not None and call.atom() == ("apps", "pods/log", "get", "p1")
    for bad in ({}, {"kind": "SubjectAccessReview", "apiVersion": "v9"},
                {**review(), "spec": "x"}, review(verb=7)):  # fmt: skip
        with pytest.raises(ReviewError):
            parse_review(bad)
    nonres = review()
    nonres["spec"] = {"user": nonres["spec"]["user"],
                      "nonResourceAttributes": {"path": "/version", "verb": "get"}}  # fmt: skip
    assert parse_review(nonres)[1].path == "/version"  # type: ignore[union-attr]


def test_the_answer_is_deny_or_no_opinion_never_allowed():
    assert response("authorization.k8s.io/v1", True, "no")["status"] == {
        "allowed": False, "denied": True, "reason": "no"}  # fmt: skip
    assert response("authorization.k8s.io/v1", False, "")["status"] == {"allowed": False}


@pytest.mark.parametrize(
    ("body", "live", "expect"),
    [
        (task(), None, None),
        (task(), True, None),
        (task(), False, "no live grant"),
        (task("Pending"), None, "not Active yet"),
        (task("Pending"), True, None),  # the leader issued it; the status follows
        (task("Cancelled"), None, "is Cancelled"),
        (task("Revoked"), True, "is Revoked"),
        (task(spec__cancel=True), True, "was cancelled"),
        (task(metadata__deletionTimestamp="2026-12-05T11:00:00Z"), True, "being deleted"),
        (task(status__expiresAt="2026-12-05T11:59:59Z"), None, "expired"),
    ],
)
def test_inactive(body, live, expect):
    why = inactive(entry_of(body), NOW, live)
    assert (why is None) if expect is None else (expect in (why or ""))


def test_an_unknown_identity_is_inactive():
    assert "no AgentTask" in (inactive(None, NOW) or "")


def test_the_entry_derives_the_identity_from_name_and_uid_only():
    entry = entry_of(task())
    assert entry is not None and entry.identity == "aat-fix-1234abcd"
    assert entry_of({"metadata": {"name": 1}}) is None
    broken = task(spec__access="nonsense")
    assert entry_of(broken).spec is None  # type: ignore[union-attr]


def policy(rules, **spec):
    return parse_policy({"kind": "AccessPolicy", "metadata": {"name": "p", "namespace": "team"},
                         "spec": {"subjects": [{"namespace": "team", "serviceAccount": "bot"}],
                                  "rules": rules, **spec}})  # fmt: skip


def test_recheck_rules_and_idle_timeout_are_read_from_the_policy():
    plain = {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}
    marked = {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"], "recheck": True}
    p = policy([plain, marked], idleTimeout="5m")
    assert p.recheck_rules == (Rule(("",), ("secrets",), ("get",)),)
    assert p.idle_timeout is not None and p.idle_timeout.total_seconds() == 300
    with pytest.raises(SpecError):
        policy([{**plain, "recheck": "yes"}])
    with pytest.raises(SpecError):
        policy([plain], idleTimeout="soon")
    rules = recheck_rules([p], "team", {})
    call = parse_review(review(resource="secrets"))[1]
    assert call is not None and needs_recheck(call, rules)
    other = parse_review(review())[1]
    assert other is not None and not needs_recheck(other, rules)
    assert recheck_rules([p], "elsewhere", {}) == []


EVENT = {
    "kind": "Event",
    "apiVersion": "audit.k8s.io/v1",
    "stage": "ResponseComplete",
    "auditID": "a1",
    "verb": "list",
    "requestURI": "/api/v1/namespaces/team/pods",
    "user": {"username": "system:serviceaccount:team:aat-fix-1234abcd"},
    "objectRef": {"resource": "pods", "namespace": "team", "apiVersion": "v1"},
    "responseStatus": {"code": 200},
    "requestReceivedTimestamp": "2026-12-05T12:00:00.000000Z",
    "stageTimestamp": "2026-12-05T12:00:00.004000Z",
    "annotations": {
        "authorization.k8s.io/decision": "allow",
        "authorization.k8s.io/reason": "RBAC: allowed",
    },
}


def test_an_audit_event_is_a_use():
    call, _ended, facts = call_of_event(EVENT)  # type: ignore[misc]
    assert (call.verb, call.resource, call.namespace) == ("list", "pods", "team")
    assert facts["decision"] == "allow" and facts["code"] == 200
    assert abs(facts["latency_ms"] - 4.0) < 0.01
    assert call_of_event({**EVENT, "stage": "RequestReceived"}) is None
    assert call_of_event({**EVENT, "user": {"username": "alice"}}) is None
    assert list(events_of({"kind": "EventList", "items": [EVENT, "junk"]})) == [EVENT]


def test_one_source_per_task_in_the_timeline():
    entry = entry_of(task())
    call = Call(user="u", home="team", identity="aat-fix-1234abcd", verb="get", resource="pods")
    moment = datetime.fromtimestamp(NOW, UTC)
    webhook = used_line(call, entry, "no-opinion", "", moment, 0.2)
    audit = used_line(call, entry, "allow", "", moment, None, AUDIT, 200)
    assert webhook["source"] == AUTHORIZER and audit["code"] == 200
    assert prefer_authorizer([webhook, audit]) == [webhook]
    assert prefer_authorizer([audit]) == [audit]


def test_many_uses_are_counted_in_the_text_timeline():
    entry = entry_of(task())
    moment = datetime.fromtimestamp(NOW, UTC)
    lines = [
        used_line(
            Call("u", "team", "aat-fix-1234abcd", "list", resource="pods", namespace="team"),
            entry,
            "no-opinion",
            "",
            moment,
            0.1,
        )
        for _ in range(30)
    ]
    path = timeline(None, [], lines)
    assert len([e for e in path["timeline"] if e["source"] == "use"]) == 30
    text = render_text([path])
    assert "uses: 30 calls" in text and "30x  list pods in team  [no-opinion]" in text
    assert summarize(lines)[0]["count"] == 30
    few = render_text([timeline(None, [], lines[:2])])
    assert few.count("used ") == 2


def test_a_call_is_the_tasks_only_with_its_tokens_credential():
    import base64
    import json as _json

    from agent_access.authz import credential_hash, token_credential

    claims = base64.urlsafe_b64encode(_json.dumps({"jti": "abc-1"}).encode()).decode().rstrip("=")
    token = f"header.{claims}.signature"
    assert token_credential(token) == "JTI=abc-1"
    assert token_credential("not-a-jwt") == "" and token_credential("a.!!!.c") == ""
    body = task()
    body["status"]["credentialHash"] = credential_hash("JTI=abc-1")
    entry = entry_of(body)
    assert entry is not None
    real = review()
    real["spec"]["extra"] = {"authentication.kubernetes.io/credential-id": ["JTI=abc-1"]}
    probe = review()  # a SubjectAccessReview someone created: no credential
    other = review()
    other["spec"]["extra"] = {"authentication.kubernetes.io/credential-id": ["JTI=zzz"]}
    made = [entry.made(parse_review(b)[1]) for b in (real, probe, other)]  # type: ignore[arg-type]
    assert made == [True, False, False]
    # no credential recorded (an older version issued it): any token's call counts,
    # a review someone made about the identity still does not
    unknown = entry_of(task())
    assert unknown is not None and unknown.made(parse_review(real)[1])  # type: ignore[arg-type]
    assert not unknown.made(parse_review(probe)[1])  # type: ignore[arg-type]


def test_an_impersonated_audit_event_is_only_a_check():
    from agent_access.uses import line_of_event

    real = {**EVENT, "user": {**EVENT["user"], "extra": {
        "authentication.kubernetes.io/credential-id": ["JTI=abc-1"]}}}  # fmt: skip
    assert line_of_event(real, lambda *_: None)["event"] == "used"  # type: ignore[index]
    posed = {**EVENT, "user": {"username": "admin"},
             "impersonatedUser": {"username": EVENT["user"]["username"]}}  # fmt: skip
    assert line_of_event(posed, lambda *_: None)["event"] == "checked"  # type: ignore[index]


def test_a_recheck_finished_before_its_callback_is_registered_does_not_deadlock():
    """A re-check can finish on its thread before `begin` registers the callback that
    forgets it; the callback then runs at once on the event loop's thread. Registered
    under the verdict lock (as it once was), that deadlocked the webhook for good."""
    import threading
    from concurrent.futures import Future

    from agent_access.gate import Gate, Pending

    class Inline:  # an executor that has finished by the time submit returns
        def submit(self, fn, *args):
            future: Future = Future()
            future.set_result(fn(*args))
            return future

    gate = Gate.__new__(Gate)
    gate._verdict_lock = threading.Lock()
    gate._verdicts, gate._computing = {}, {}
    gate._pool = Inline()
    gate._compute = lambda pending: None
    pending = Pending("v1", None, None, 0.0, 0.0, ("task", 1))  # type: ignore[arg-type]
    result: list = []
    worker = threading.Thread(target=lambda: result.append(gate.begin(pending)), daemon=True)
    worker.start()
    worker.join(5)
    assert not worker.is_alive(), "begin() deadlocked on its own lock"
    assert result[0].result() is None
    assert gate._computing == {}  # forgotten once done: the next call computes afresh
