"""Pods that really run, on the local node (make e2e-node; collected only with E2E_NODE=1).

The operator is the chart's Deployment, from the image `make image-oci` built; the
agents are busybox Pods running as their ServiceAccount with its projected token.
Nothing here sets a Pod's phase: the kubelet does.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.integration.cluster import (
    ROOT,
    as_token,
    list_pods_status,
    poll_status,
    record_timing,
    wait_for,
)

from agent_access.kube import PODS, SERVICE_ACCOUNTS

from .conftest import NAMESPACE, RELEASE

KUBECTL = str(Path(sys.executable).with_name("kubectl"))
BUSYBOX = "localhost/busybox:local"
READ_PODS = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]
# The agent: runs until told it is done (a file appears), then exits 0; on SIGTERM it
# exits at once, so a deleted Pod is gone after its short grace period.
AGENT_SCRIPT = "trap 'exit 0' TERM; while [ ! -e /tmp/done ]; do sleep 0.2; done; exit 0"
# An agent in Python (the operator's image has Python; busybox's TLS client cannot talk
# to a modern API server): inside its Pod, it reads the task's token Secret with the
# Pod's own projected ServiceAccount token (the token-reader Role allows just that),
# verifying the API server against the Pod's CA, then uses the task's token.
PY_AGENT = "import os, time\nwhile not os.path.exists('/tmp/done'): time.sleep(0.2)"
USE_GRANT = """
import base64, json, os, ssl, sys, urllib.error, urllib.request
sa = "/var/run/secrets/kubernetes.io/serviceaccount"
env = os.environ
api = "https://%s:%s" % (env["KUBERNETES_SERVICE_HOST"], env["KUBERNETES_SERVICE_PORT"])
ctx = ssl.create_default_context(cafile=sa + "/ca.crt")
def get(path, token):
    req = urllib.request.Request(api + path, headers={"Authorization": "Bearer " + token})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, None
own, ns = open(sa + "/token").read(), open(sa + "/namespace").read()
code, secret = get("/api/v1/namespaces/%s/secrets/%s" % (ns, sys.argv[1]), own)
print("secret", code)
task_token = base64.b64decode(secret["data"]["token"]).decode()
print("pods", get("/api/v1/namespaces/%s/pods" % sys.argv[2], task_token)[0])
print("secrets", get("/api/v1/namespaces/%s/secrets" % sys.argv[2], task_token)[0])
"""


def kubectl(kubeconfig: str, *args: str, check: bool = True) -> str:
    res = subprocess.run(
        [KUBECTL, f"--kubeconfig={kubeconfig}", *args], capture_output=True, text=True, timeout=120
    )
    if check and res.returncode:
        raise AssertionError(f"kubectl {' '.join(args)}: {res.stderr.strip()}")
    return res.stdout


def operator_image(world) -> str:
    return operator_pods(world)[0]["spec"]["containers"][0]["image"]


def agent_pod(world, ns: str, name: str, sa: str, image: str = BUSYBOX) -> dict:
    body = {
        "metadata": {"name": name},
        "spec": {
            "serviceAccountName": sa,
            "terminationGracePeriodSeconds": 2,
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "agent",
                    "image": image,
                    "imagePullPolicy": "Never",
                    "command": (
                        ["sh", "-c", AGENT_SCRIPT]
                        if image == BUSYBOX
                        else ["python3", "-c", PY_AGENT]
                    ),
                    "securityContext": {
                        "runAsUser": 65534,
                        "runAsNonRoot": True,
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    }
    world.kube.create(PODS, ns, body)
    return wait_for(
        lambda: (
            (p := world.kube.get(PODS, ns, name)) and p["status"].get("phase") == "Running" and p
        ),
        60,
        what=f"{ns}/{name} Running",
    )


def scene(world, name: str, image: str = BUSYBOX):
    agents, target = world.namespace("node-agents"), world.namespace("node-target")
    world.service_account(agents, "bot")
    world.policy(target, "read", [(agents, "bot")], READ_PODS)
    pod = agent_pod(world, agents, name, "bot", image)
    world.task(agents, name, "bot", [{"namespace": target, "rules": READ_PODS}], podName=name)
    task = world.wait_phase(agents, name, "Active", 30)
    return agents, target, pod, task


def operator_pods(world) -> list[dict]:
    return [
        p
        for p in world.kube.list(
            PODS, NAMESPACE, label_selector="app.kubernetes.io/component=operator"
        )
        if not p["metadata"].get("deletionTimestamp")
    ]


def test_the_operator_runs_from_its_oci_image_as_the_chart_says(world):
    pods = operator_pods(world)
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    pod = pods[0]
    spec, status = pod["spec"]["containers"][0], pod["status"]
    assert spec["image"].startswith("localhost/agent-access-operator:"), spec["image"]
    assert spec["imagePullPolicy"] == "Never"
    assert status["phase"] == "Running"
    ready = {c["type"]: c["status"] for c in status["conditions"]}
    assert ready["Ready"] == "True", status  # the readiness probe passes
    assert status["containerStatuses"][0]["restartCount"] == 0  # and liveness never failed
    who = kubectl(world.kubeconfig, "exec", "-n", NAMESPACE, pod["metadata"]["name"], "--", "id")
    assert who.startswith("uid=65532(operator) gid=65532(operator)"), who
    # no build tools and no pip in the image
    probe = kubectl(
        world.kubeconfig,
        "exec", "-n", NAMESPACE, pod["metadata"]["name"], "--",
        "python3", "-c",
        "import importlib.util as u, shutil; "
        "print([m for m in ('pip', 'ensurepip', 'setuptools') if u.find_spec(m)], "
        "[t for t in ('gcc', 'cc', 'make', 'apt-get', 'pip') if shutil.which(t)])",
    )  # fmt: skip
    assert probe.strip() == "[] []", probe


def test_a_pod_that_exits_0_completes_its_task_and_its_token_is_refused(world):
    agents, target, pod, task = scene(world, "finisher", operator_image(world))
    assert pod["spec"]["nodeName"], "scheduled onto the node"
    name = task["metadata"]["name"]
    # the agent really uses the grant, from inside its Pod, with its own token
    used = kubectl(
        world.kubeconfig,
        "exec", "-n", agents, name, "--", "python3", "-c", USE_GRANT,
        task["status"]["tokenSecretName"], target,
    )  # fmt: skip
    assert used.split() == ["secret", "200", "pods", "200", "secrets", "403"], used
    client = as_token(world.kubeconfig, world.token(task))
    assert list_pods_status(client, target) == 200
    kubectl(
        world.kubeconfig,
        "exec", "-n", agents, name, "--", "python3", "-c", "open('/tmp/done', 'w')",
    )  # fmt: skip
    started = time.monotonic()
    done = world.wait_phase(agents, name, "Completed", 30)
    assert done["status"]["reason"] == "PodSucceeded", done["status"]
    assert world.kube.get(PODS, agents, name)["status"]["phase"] == "Succeeded"
    poll_status(lambda: list_pods_status(client, target), {401, 403}, 5.0)
    record_timing("node_pod_exit_to_refused_s", time.monotonic() - started)
    wait_for(lambda: world.task_objects(task) == [], 15, what="the grant's objects gone")


class Operator:
    """The chart's Deployment, scaled to 0 (stopped: SIGTERM, the Lease given up) and back."""

    def __init__(self, world):
        self.world = world
        self.deploy = f"deployment/{RELEASE}"

    def scale(self, n: int) -> None:
        kubectl(self.world.kubeconfig, "scale", "-n", NAMESPACE, self.deploy, f"--replicas={n}")
        if n:
            kubectl(
                self.world.kubeconfig,
                "rollout", "status", "-n", NAMESPACE, self.deploy, "--timeout=120s",
            )  # fmt: skip
        all_pods = lambda: self.world.kube.list(  # noqa: E731
            PODS, NAMESPACE, label_selector="app.kubernetes.io/component=operator"
        )
        wait_for(lambda: len(all_pods()) == n, 60, what=f"{n} operator Pods")


@pytest.fixture
def operator(world):
    op = Operator(world)
    yield op
    if len(operator_pods(world)) != 1:
        op.scale(1)


def test_a_pod_deleted_while_the_operator_is_stopped_loses_its_identity(world, operator):
    agents, target, _, task = scene(world, "orphan")
    name, uid = task["metadata"]["name"], task["metadata"]["uid"]
    client = as_token(world.kubeconfig, world.token(task))
    assert list_pods_status(client, target) == 200
    identity = task["status"]["serviceAccountName"]
    operator.scale(0)
    started = time.monotonic()
    world.kube.delete(PODS, agents, name)
    # the garbage collector removes the per-task identity: its owner, the Pod, is gone
    wait_for(
        lambda: world.kube.get(SERVICE_ACCOUNTS, agents, identity) is None,
        60,
        what="per-task ServiceAccount collected",
    )
    collected = time.monotonic() - started
    poll_status(lambda: list_pods_status(client, target), {401}, 30.0, interval=0.1)
    refused = time.monotonic() - started
    record_timing("node_pod_deleted_to_identity_collected_s", collected)
    record_timing("node_pod_deleted_to_token_refused_s", refused)
    print(
        f"operator stopped, pod deleted: identity collected in {collected:.1f} s, "
        f"token refused (401) in {refused:.1f} s"
    )
    operator.scale(1)
    final = world.wait_phase(agents, name, "Revoked", 60)
    assert final["status"]["reason"] == "PodDeleted", final["status"]
    assert final["metadata"]["uid"] == uid
    wait_for(lambda: world.task_objects(task) == [], 30, what="nothing of the grant left")
    assert "PodDeleted" in json.dumps(world.events(agents, name))


def test_the_host_shows_no_trace_of_the_node_while_it_runs():
    """kubelet, containerd, kube-proxy and the CNI plugin wrote their sysctls, mounts,
    files and iptables chains inside the node's own namespaces: the host keeps its
    sysctl values and has none of their mounts, directories or chains."""
    sys.path.insert(0, str(ROOT / "hack"))
    import node

    state = json.loads((ROOT / ".node" / "state.json").read_text())
    assert node.leaks(state) == []
    assert state["before"]["sysctls"], "sysctls were recorded"


def test_the_kubelet_api_takes_no_anonymous_caller_and_authorizes_every_other(world):
    """The kubelet answers only authenticated callers it may authorize (Webhook): no
    anonymous access, and a valid token without `nodes/proxy` gets 403, while the API
    server's own client (logs, exec) works, as the other tests show."""
    import ssl
    import urllib.error
    import urllib.request

    from agent_access.kube import Resource

    node = world.kube.get(Resource("/api/v1", "nodes", namespaced=False), None, "aao-node")
    address = next(a["address"] for a in node["status"]["addresses"] if a["type"] == "InternalIP")
    port = node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE

    def call(path: str, token: str | None = None) -> int:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        req = urllib.request.Request(f"https://{address}:{port}{path}", headers=headers)
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    ns = world.namespace("kubelet-probe")
    world.service_account(ns, "nobody")
    token, _ = world.kube.request_token(ns, "nobody", 600, (), None)
    for path in ("/pods", "/healthz", "/metrics", "/runningpods/", "/configz"):
        assert call(path) == 401, path
        assert call(path, token) == 403, path
