"""The operator as the API server's authorization webhook, against a real kube-apiserver
configured with it (AuthorizationConfiguration: the webhook first, for per-task
identities only, failurePolicy Deny, nothing cached; then Node and RBAC), and with
its audit log on: every call of a per-task identity seen, logged once, refused when
its task is not Active (even while RBAC would still allow it), `recheck` rules
re-evaluated at call time, idle grants ended, and nobody else affected."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import jsonschema
import pytest

from agent_access.kube import (
    ACCESS_POLICIES,
    AGENT_TASKS,
    PODS,
    ROLE_BINDINGS,
    SECRETS,
    Resource,
)

from .cluster import (
    ROOT,
    OperatorProcess,
    World,
    admin,
    apply_crds,
    as_token,
    poll_status,
    record_timing,
    status_code,
    wait_for,
)

sys.path.insert(0, str(ROOT / "hack"))
import controlplane

#: docs/audit.schema.json: every line the operator writes fits it.
LINE_SCHEMA = jsonschema.Draft202012Validator(
    json.loads((ROOT / "docs" / "audit.schema.json").read_text()),
    format_checker=jsonschema.FormatChecker(),
)
#: The webhook unreachable (failurePolicy Deny): the API server refuses with 500, naming
#: the failure, or 403.
UNREACHABLE = {403, 500}
CONFIG_MAPS = Resource("/api/v1", "configmaps")
PODS_RULE = {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}
MAPS_RULE = {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list"]}


@pytest.fixture(scope="module")
def authz_kubeconfig():
    """A control plane of its own: its API server asks the operator about every call of
    a per-task identity (AUTHZ_WEBHOOK=1) and writes an audit log (AUDIT_LOG=1)."""
    with controlplane.temporary("aao-authz-", {"authz": True, "audit_log": True}) as path:
        apply_crds(path)
        yield path


def authz_dir(kubeconfig: str) -> Path:
    return Path(kubeconfig).parent / "authz"


def authz_args(kubeconfig: str) -> list[str]:
    d = authz_dir(kubeconfig)
    return [
        "--authz-port", (d / "port").read_text(), "--authz-cert", str(d / "tls.crt"),
        "--authz-key", str(d / "tls.key"), "--authz-client-ca", str(d / "client-ca.crt"),
        "--authz-host", "127.0.0.1",
    ]  # fmt: skip


@pytest.fixture
def enforcer(authz_kubeconfig, tmp_path):
    """Start operators serving the webhook (env: fault points); killed after the test."""
    started: list[OperatorProcess] = []

    def start(env=None, wait=30, extra=(), port=None) -> OperatorProcess:
        workdir = tmp_path / f"operator-{len(started)}"
        workdir.mkdir()
        proc = OperatorProcess(authz_kubeconfig, workdir, env=env)
        args = authz_args(authz_kubeconfig)
        if port is not None:  # a second replica: a port of its own, same certificate
            args[args.index("--authz-port") + 1] = str(port)
        proc.start([*args, *extra], wait=wait)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


@pytest.fixture
def aworld(authz_kubeconfig):
    return World(admin(authz_kubeconfig), authz_kubeconfig)


def scene(world: World, rules=None, **policy):
    ns = world.namespace("authz")
    world.service_account(ns, "bot")
    world.policy(ns, "p", [(ns, "bot")], rules or [PODS_RULE, {**MAPS_RULE, "recheck": True}],
                 **policy)  # fmt: skip
    return ns


def grant(world: World, ns: str, name: str, rules=None):
    world.task(ns, name, "bot", [{"namespace": ns, "rules": rules or [PODS_RULE, MAPS_RULE]}])
    task = world.wait_phase(ns, name, "Active")
    return task, as_token(world.kubeconfig, world.token(task))


def lists(client, ns: str, what=CONFIG_MAPS) -> int:
    return status_code(lambda: client.list(what, ns))


def uses(proc: OperatorProcess, task: dict) -> list[dict]:
    uid = task["metadata"]["uid"]
    return [
        line for line in proc.audit_lines()
        if line["event"] == "used" and (line.get("task") or {}).get("uid") == uid
    ]  # fmt: skip


def token_of(world: World, ns: str, sa: str) -> str:
    token, _ = world.kube.request_token(ns, sa, 600, (), None)
    return token


def authz_calls(proc: OperatorProcess) -> float:
    total = 0.0
    for line in proc.metrics().splitlines():
        if line.startswith("agentaccess_authz_calls_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_each_call_is_seen_once_with_its_fields(aworld, enforcer):
    proc = enforcer()
    ns = scene(aworld)
    task, client = grant(aworld, ns, "seen")
    assert lists(client, ns) == 200
    assert status_code(lambda: client.get(CONFIG_MAPS, ns, "absent")) == 403  # not granted
    assert lists(client, ns, SECRETS) == 403  # RBAC: not granted
    wait_for(lambda: len(uses(proc, task)) >= 3, 5, what="three use lines")
    time.sleep(0.3)
    lines = uses(proc, task)
    assert len(lines) == 3, lines  # each call once
    calls = [(u["verb"], u["resource"], u["name"]) for u in lines]
    assert calls == [("list", "configmaps", ""), ("get", "configmaps", "absent"),
                     ("list", "secrets", "")]  # fmt: skip
    for u in lines:
        assert u["task"] == {"name": "seen", "namespace": ns, "uid": task["metadata"]["uid"]}
        assert u["agent"] == "bot" and u["requester"] == "admin"
        assert u["namespace"] == ns and u["subresource"] == ""
        assert u["decision"] == "no-opinion" and u["reason"] == ""
        assert u["event"] == "used"  # made with the task's own token
        assert u["source"] == "authorizer" and 0 <= u["latencyMs"] < 1000
        assert u["identity"] == f"{ns}/{task['status']['serviceAccountName']}"
        LINE_SCHEMA.validate(u)


def test_nobody_else_waits_on_the_webhook(aworld, enforcer):
    """Other identities are never sent to it (matchConditions), and keep being served
    when the operator is down (failurePolicy Deny concerns per-task identities only)."""
    proc = enforcer()
    ns = scene(aworld)
    _, client = grant(aworld, ns, "others")
    aworld.service_account(ns, "plain")
    aworld.allow(ns, "plain-read", [f"system:serviceaccount:{ns}:plain"], ["configmaps"],
                 ["list"], group="")  # fmt: skip
    plain = as_token(aworld.kubeconfig, token_of(aworld, ns, "plain"))
    before = authz_calls(proc)
    for _ in range(5):
        assert lists(plain, ns) == 200
        aworld.kube.list(CONFIG_MAPS, ns)
    assert authz_calls(proc) == before  # not one review for them
    assert lists(client, ns) == 200
    wait_for(lambda: authz_calls(proc) == before + 1, 5, what="the task's call reviewed")

    proc.kill()
    assert lists(client, ns) in UNREACHABLE  # per-task identities refused
    assert lists(plain, ns) == 200  # everyone else served as before
    aworld.kube.list(CONFIG_MAPS, ns)


def test_a_cancelled_task_is_refused_while_its_role_binding_still_exists(aworld, enforcer):
    proc = enforcer(env={"AGENT_ACCESS_HOLD": "revoke:start=6"})
    ns = scene(aworld)
    task, client = grant(aworld, ns, "cancelled")
    assert lists(client, ns, what=PODS) == 200
    started = time.monotonic()
    aworld.kube.merge_patch(AGENT_TASKS, ns, "cancelled", {"spec": {"cancel": True}})
    took = poll_status(lambda: lists(client, ns, PODS), {403}, 2.0)
    record_timing("webhook: cancel -> 403 (revocation held)", took)
    binding = task["status"]["grants"][0]["roleBindingName"]
    assert aworld.kube.get(ROLE_BINDINGS, ns, binding) is not None  # RBAC alone would allow
    assert time.monotonic() - started < 5
    wait_for(lambda: any(u["decision"] == "deny" for u in uses(proc, task)), 5)
    denied = [u for u in uses(proc, task) if u["decision"] == "deny"]
    assert "cancelled" in denied[0]["reason"] and denied[0]["event"] == "used"
    done = aworld.wait_phase(ns, "cancelled", "Cancelled", timeout=20)
    assert done["status"]["reason"] == "Cancelled"


def test_a_recheck_rule_is_refused_the_moment_its_policy_changes(aworld, enforcer):
    """The re-evaluation handler is held: only the call-time re-check can refuse."""
    proc = enforcer(env={"AGENT_ACCESS_HOLD": "reevaluate:start=8"})
    ns = scene(aworld)
    task, client = grant(aworld, ns, "rechecked")
    assert lists(client, ns) == 200  # configmaps: a recheck rule, re-checked and fine
    assert lists(client, ns, PODS) == 200
    started = time.monotonic()
    aworld.kube.merge_patch(ACCESS_POLICIES, ns, "p", {"spec": {"rules": [PODS_RULE]}})
    took = poll_status(lambda: lists(client, ns), {403}, 2.0)
    record_timing("webhook: policy change -> recheck call 403 (re-evaluation held)", took)
    binding = task["status"]["grants"][0]["roleBindingName"]
    assert aworld.kube.get(ROLE_BINDINGS, ns, binding) is not None
    # a call of a rule without recheck is left to RBAC until the re-evaluation runs
    assert lists(client, ns, PODS) == 200
    assert time.monotonic() - started < 6
    wait_for(lambda: any(u["decision"] == "deny" for u in uses(proc, task)), 5)
    denied = next(u for u in uses(proc, task) if u["decision"] == "deny")
    assert denied["resource"] == "configmaps" and denied["reason"].startswith("re-check failed")
    done = aworld.wait_phase(ns, "rechecked", "Revoked", timeout=20)
    assert done["status"]["reason"] == "PolicyChanged"


def test_idle_timeout_ends_an_unused_grant_and_calls_keep_it(aworld, enforcer):
    enforcer()
    ns = scene(aworld, idleTimeout="10s")
    _, client = grant(aworld, ns, "idle")
    granted = time.monotonic()
    for _ in range(3):  # a call every 4 s keeps it past its first idle deadline
        time.sleep(4)
        assert lists(client, ns, PODS) == 200
    assert time.monotonic() - granted > 12
    assert aworld.get_task(ns, "idle")["status"]["phase"] == "Active"
    last = time.monotonic()
    done = aworld.wait_phase(ns, "idle", "Expired", timeout=20)
    idle_for = time.monotonic() - last
    assert done["status"]["reason"] == "IdleTimeout", done["status"]
    assert 9 <= idle_for <= 13, idle_for
    assert done["status"]["lastUsedAt"]
    poll_status(lambda: lists(client, ns, PODS), {401, 403}, 2.0)


def test_reviews_about_the_identity_are_not_calls(aworld, enforcer):
    """Whoever may create (Local)SubjectAccessReviews can ask about a per-task identity:
    the webhook answers and logs it as `checked`, but it is no call of the agent and
    keeps no idle grant alive."""
    proc = enforcer()
    ns = scene(aworld, idleTimeout="10s")
    task, _ = grant(aworld, ns, "probed")
    user = f"system:serviceaccount:{ns}:{task['status']['serviceAccountName']}"
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "LocalSubjectAccessReview",
        "spec": {"user": user, "resourceAttributes": {
            "namespace": ns, "verb": "list", "resource": "configmaps"}},
    }  # fmt: skip
    path = f"/apis/authorization.k8s.io/v1/namespaces/{ns}/localsubjectaccessreviews"
    granted = time.monotonic()
    ended = None
    while time.monotonic() - granted < 20:
        aworld.kube.request("POST", path, body=review)
        phase = aworld.get_task(ns, "probed")["status"]["phase"]
        if phase != "Active":
            ended = time.monotonic() - granted
            break
        time.sleep(2)
    assert ended is not None and ended < 14, ended  # the reviews did not keep it alive
    assert aworld.get_task(ns, "probed")["status"]["reason"] == "IdleTimeout"
    checked = [
        line
        for line in proc.audit_lines()
        if line["event"] == "checked" and (line.get("task") or {}).get("name") == "probed"
    ]
    assert checked and not uses(proc, task)  # fmt: skip
    for line in checked:
        LINE_SCHEMA.validate(line)
    # what the reviewer learns: the kind of refusal, never the task's name
    answer = aworld.kube.request("POST", path, body=review)["status"]
    assert answer.get("allowed") is not True and "probed" not in answer.get("reason", "")


def test_a_restarted_operator_answers_as_before(aworld, enforcer):
    proc = enforcer()
    ns = scene(aworld)
    _, client = grant(aworld, ns, "restart")
    assert lists(client, ns) == 200
    proc.kill()
    assert lists(client, ns) in UNREACHABLE
    proc.start(authz_args(aworld.kubeconfig))
    wait_for(lambda: lists(client, ns) == 200, 10, what="served again after the restart")
    aworld.kube.merge_patch(AGENT_TASKS, ns, "restart", {"spec": {"cancel": True}})
    poll_status(lambda: lists(client, ns), {401, 403}, 2.0)


def test_an_identity_made_to_look_like_a_task_is_refused(aworld, enforcer):
    """An `aat-` ServiceAccount nobody's task owns, bound by hand: the webhook knows no
    task with that identity and refuses every call of it, whatever RBAC says."""
    proc = enforcer()
    ns = scene(aworld)
    aworld.service_account(ns, "aat-forged-12345678")
    user = f"system:serviceaccount:{ns}:aat-forged-12345678"
    aworld.allow(ns, "forged", [user], ["configmaps"], ["list"], group="")
    forged = as_token(aworld.kubeconfig, token_of(aworld, ns, "aat-forged-12345678"))
    assert lists(forged, ns) == 403
    wait_for(
        lambda: any(line.get("identity") == f"{ns}/aat-forged-12345678"
                    and line["decision"] == "deny" for line in proc.audit_lines()),
        5, what="the forged identity's call logged as denied",
    )  # fmt: skip


def test_the_webhook_serves_only_the_api_server(aworld, enforcer):
    """Without the API server's client certificate no review is read: nobody can forge
    calls to keep an idle grant alive or write use lines."""
    enforcer()
    d = authz_dir(aworld.kubeconfig)
    port = int((d / "port").read_text())
    ctx = ssl.create_default_context(cafile=str(d / "client-ca.crt"))

    def post_without_certificate() -> None:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(b"POST /authorize HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
            if not tls.recv(100):
                raise ConnectionResetError("closed without an answer")

    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        post_without_certificate()
    ctx.load_cert_chain(str(d / "apiserver-client.crt"), str(d / "apiserver-client.key"))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert tls.recv(100).startswith(b"HTTP/1.1 200")


def test_audit_shows_uses_in_the_timeline_aggregated_and_every_line_as_json(aworld, enforcer):
    proc = enforcer()
    ns = scene(aworld)
    task, client = grant(aworld, ns, "timeline")
    for _ in range(25):
        assert lists(client, ns) == 200
    assert lists(client, ns, SECRETS) == 403
    wait_for(lambda: len(uses(proc, task)) == 26, 5, what="26 use lines")
    exe = Path(sys.executable).with_name("agent-access-operator")
    env = {"KUBECONFIG": aworld.kubeconfig, "PATH": "/usr/bin:/bin"}
    base = [str(exe), "audit", "timeline", "-n", ns, "--audit-file", str(proc.audit_file)]
    text = subprocess.run(base, env=env, capture_output=True, text=True, check=True).stdout
    assert "uses: 26 calls" in text, text
    assert f"25x  list configmaps in {ns}  [no-opinion]" in text, text
    assert f"1x  list secrets in {ns}  [no-opinion]" in text, text
    out = subprocess.run([*base, "-o", "json"], env=env, capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    entries = json.loads(out)["tasks"][0]["timeline"]
    used = [e for e in entries if e["source"] == "use"]
    assert len(used) == 26 and all(e["decision"] == "no-opinion" for e in used)
    # the same calls from the API server's own audit log (clusters without the webhook)
    log = Path(aworld.kubeconfig).parent / "audit.log"
    wait_for(lambda: log.read_text().count(task["status"]["serviceAccountName"]) >= 26, 10)
    out = subprocess.run(
        [str(exe), "audit", "timeline", "-n", ns, "--apiserver-log", str(log), "-o", "json"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    from_log = [e for e in json.loads(out)["tasks"][0]["timeline"] if e["source"] == "use"]
    decisions = sorted(e["decision"] for e in from_log)
    assert decisions == ["allow"] * 25 + ["forbid"], decisions
    assert all(e["via"] == "audit" and e["code"] in (200, 403) for e in from_log)


def review_to(kubeconfig: str, port: int, user: str, ns: str, credential: str = "") -> dict:
    """POST a SubjectAccessReview to one replica's webhook port, as the API server does
    (with its client certificate)."""
    import urllib.request

    d = authz_dir(kubeconfig)
    ctx = ssl.create_default_context(cafile=str(d / "client-ca.crt"))
    ctx.load_cert_chain(str(d / "apiserver-client.crt"), str(d / "apiserver-client.key"))
    spec: dict = {"user": user, "resourceAttributes": {
        "namespace": ns, "verb": "list", "version": "v1", "resource": "pods"}}  # fmt: skip
    if credential:
        spec["extra"] = {"authentication.kubernetes.io/credential-id": [credential]}
    body = json.dumps({"apiVersion": "authorization.k8s.io/v1",
                       "kind": "SubjectAccessReview", "spec": spec}).encode()  # fmt: skip
    request = urllib.request.Request(
        f"https://127.0.0.1:{port}/authorize", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, context=ctx, timeout=5) as r:
        return json.loads(r.read())["status"]


def test_a_standby_answers_from_its_own_watches(aworld, enforcer, tmp_path):
    """Two replicas on one Lease, both serving the webhook: the standby refuses a
    cancelled task's identity from the same watch event, while the leader's revocation
    is still held (nothing in the status says so yet)."""
    from .cluster import free_port, unique

    lease = ["--leader-elect", "--leader-election-namespace", aworld.namespace("lease"),
             "--leader-election-id", unique("aao"), "--lease-duration", "6",
             "--lease-retry", "0.5"]  # fmt: skip
    leader = enforcer(env={"AGENT_ACCESS_HOLD": "revoke:start=6"}, extra=lease)
    standby_port = free_port()
    standby = enforcer(extra=lease, port=standby_port, wait=0)
    wait_for(lambda: role(standby) == "standby", 20, what="the second replica stands by")
    ns = scene(aworld)
    task, client = grant(aworld, ns, "standby")
    user = f"system:serviceaccount:{ns}:{task['status']['serviceAccountName']}"
    assert lists(client, ns, PODS) == 200  # through the leader (the API server's port)
    assert review_to(aworld.kubeconfig, standby_port, user, ns) == {"allowed": False}
    aworld.kube.merge_patch(AGENT_TASKS, ns, "standby", {"spec": {"cancel": True}})
    answered = wait_for(
        lambda: (s := review_to(aworld.kubeconfig, standby_port, user, ns)).get("denied") and s,
        2, 0.005, "the standby refuses the cancelled task",
    )  # fmt: skip
    assert "not active" in answered["reason"]
    assert aworld.get_task(ns, "standby")["status"]["phase"] == "Active"  # still held
    del leader


def role(op: OperatorProcess) -> str:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{op.port}/readyz", timeout=1) as r:
            return r.read().decode().strip()
    except OSError:
        return "down"


def healthz(proc: OperatorProcess, path: str = "/healthz") -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{proc.port}{path}", timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_stuck_webhook_fails_healthz_and_its_identities_are_refused(aworld, enforcer):
    """The webhook's event loop blocked (held on a review, as a deadlock once did): the
    API server refuses the identity on its timeout (failure policy Deny: 500), and the
    operator's /healthz and /readyz answer 503 (restarted, out of the Service); 200 again
    once the loop runs."""
    proc = enforcer(env={"AGENT_ACCESS_HOLD": "authz:review=14x1"})
    ns = scene(aworld)
    _, client = grant(aworld, ns, "stuck")
    assert healthz(proc) == 200
    answers: list[int] = []
    started = time.monotonic()
    caller = threading.Thread(target=lambda: answers.append(lists(client, ns, PODS)))
    caller.start()
    caller.join(10)
    # refused, not waited out: the API server gives up after its 3 s timeout and, with
    # failurePolicy Deny, answers 500 (the authorizer's error), never the request
    assert answers and answers[0] in (403, 500)
    assert healthz(proc) == 200  # stuck for less than STUCK_AFTER so far
    wait_for(lambda: healthz(proc) == 503, 12)
    record_timing("webhook: event loop blocked -> /healthz 503", time.monotonic() - started)
    assert healthz(proc, "/readyz") == 503
    wait_for(lambda: healthz(proc) == 200 and healthz(proc, "/readyz") == 200, 15)
    # held once: answering again (right after the stall the loop still counts as behind
    # for one 50 ms probe, and refuses as overloaded meanwhile)
    wait_for(lambda: lists(client, ns, what=PODS) == 200, 5)
