"""Helpers for integration tests: admin and token clients, waiting, the operator process."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import kubernetes
import yaml

from agent_access.kube import (
    ACCESS_POLICIES,
    AGENT_TASK_APPROVALS,
    AGENT_TASKS,
    CLUSTER_ACCESS_POLICIES,
    NAMESPACES,
    PODS,
    ROLE_BINDINGS,
    ROLES,
    SECRETS,
    SERVICE_ACCOUNTS,
    Kube,
    KubeError,
)

ROOT = Path(__file__).resolve().parents[2]
#: Every token read in tests, for the scan that proves none leaked.
SEEN_TOKENS: list[str] = []


def apply_crds(kubeconfig: str) -> None:
    """kubectl apply -f crds/ and wait until they are established."""
    kubectl = Path(sys.executable).with_name("kubectl")
    env = dict(os.environ, KUBECONFIG=kubeconfig)
    subprocess.run(
        [str(kubectl), "apply", "-f", str(ROOT / "crds")],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    subprocess.run(
        [str(kubectl), "wait", "--for", "condition=established", "crd", "--all", "--timeout=60s"],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    wait_for_storage(admin(kubeconfig))
    wait_for_admission(admin(kubeconfig))


def _until_answers(
    call: Callable[[], Any], transient: int, timeout: float, what: str, also: str = ""
) -> None:
    """Call until it stops failing with the `transient` status, or a 422 saying `also`
    (other errors raise)."""

    def ready() -> bool:
        try:
            call()
            return True
        except KubeError as exc:
            if exc.status == transient or (also and exc.status == 422 and also in exc.reason):
                return False
            raise

    wait_for(ready, timeout, 0.2, what)


def wait_for_storage(kube: Kube, timeout: float = 60) -> None:
    """A new CRD's watch cache answers 429 "storage is (re)initializing" for a while:
    wait until lists of all three kinds answer at once, so timing tests do not start
    inside that window (each such 429 costs a caller its 1 s Retry-After)."""
    quick = Kube(kube.api, retries=0)
    kinds = (AGENT_TASKS, ACCESS_POLICIES, CLUSTER_ACCESS_POLICIES, AGENT_TASK_APPROVALS)
    _until_answers(lambda: [quick.list(k) for k in kinds], 429, timeout, "the CRDs' storage")


def wait_for_admission(kube: Kube, timeout: float = 90) -> None:
    """The MutatingAdmissionPolicy on AgentTasks learns a new CRD's type with a delay
    (the API server answers 503 until then): wait until a dry-run create passes."""
    body = {
        "apiVersion": "agentaccess.io/v1alpha1",
        "kind": "AgentTask",
        "metadata": {"name": "admission-ready"},
        "spec": {
            "agent": "x",
            "intent": "probe",
            "access": [{"rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]}],
        },
    }
    _until_answers(
        lambda: kube.request(
            "POST", AGENT_TASKS.path("default"), body=body, query=[("dryRun", "All")]
        ),
        503,
        timeout,
        "the admission policies to know AgentTasks",
    )
    approval = {
        "apiVersion": "agentaccess.io/v1alpha1",
        "kind": "AgentTaskApproval",
        "metadata": {"name": "admission-ready"},
        "spec": {"taskName": "none", "taskUID": "none", "decision": "Approve"},
    }
    _until_answers(
        lambda: kube.request(
            "POST", AGENT_TASK_APPROVALS.path("default"), body=approval, query=[("dryRun", "All")]
        ),
        503,
        timeout,
        "the admission policies to know AgentTaskApprovals",
        # the self-approval policy's parameters (AgentTasks) are found a moment later
        also="failed to find resource referenced by paramKind",
    )


def admin(kubeconfig: str) -> Kube:
    config = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=config)
    config.connection_pool_maxsize = 16
    return Kube(kubernetes.client.ApiClient(config), retries=3)


def token_kubeconfig(
    kubeconfig: str, namespace: str, sa: str, path: Path, seconds: int = 7200
) -> str:
    """A kubeconfig (written to `path`) that authenticates only as this ServiceAccount,
    with a token the admin of `kubeconfig` requests for it. Returns the path."""
    token, _ = admin(kubeconfig).request_token(namespace, sa, seconds, (), None)
    cfg = yaml.safe_load(Path(kubeconfig).read_text())
    ctx = next(c for c in cfg["contexts"] if c["name"] == cfg["current-context"])["context"]
    cluster = next(c for c in cfg["clusters"] if c["name"] == ctx["cluster"])
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "operator",
                "clusters": [{"name": "c", "cluster": cluster["cluster"]}],
                "users": [{"name": "operator", "user": {"token": token}}],
                "contexts": [{"name": "operator", "context": {"cluster": "c", "user": "operator"}}],
            }
        )
    )
    path.chmod(0o600)
    return str(path)


def as_user(kubeconfig: str, user: str, groups: tuple[str, ...] = ()) -> Kube:
    """The admin client impersonating someone (a person, or a ServiceAccount by its
    username): RBAC and admission see that identity, exactly as for its own requests."""
    config = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=config)
    client = kubernetes.client.ApiClient(config)
    client.set_default_header("Impersonate-User", user)
    for group in groups:  # the client keeps one value per header: the last group wins
        client.set_default_header("Impersonate-Group", group)
    return Kube(client, retries=0)


def as_token(kubeconfig: str, token: str) -> Kube:
    """A client that authenticates only with the given bearer token (no retries)."""
    base = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=base)
    config = kubernetes.client.Configuration()
    config.host = base.host
    config.ssl_ca_cert = base.ssl_ca_cert
    config.api_key = {"BearerToken": token}
    config.api_key_prefix = {"BearerToken": "Bearer"}
    return Kube(kubernetes.client.ApiClient(config), retries=0)


def wait_for(predicate: Callable[[], Any], timeout: float = 10, interval: float = 0.05, what=""):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def status_code(fn: Callable[[], Any]) -> int:
    try:
        fn()
        return 200
    except KubeError as exc:
        return exc.status


class World:
    """Objects a test creates, on the admin client."""

    def __init__(self, kube: Kube, kubeconfig: str):
        self.kube = kube
        self.kubeconfig = kubeconfig

    def namespace(self, prefix: str = "ns", labels: dict | None = None) -> str:
        name = unique(prefix)
        self.kube.create(NAMESPACES, None, {"metadata": {"name": name, "labels": labels or {}}})
        return name

    def service_account(self, ns: str, name: str) -> None:
        self.kube.create(SERVICE_ACCOUNTS, ns, {"metadata": {"name": name}})

    def pod(self, ns: str, name: str, sa: str) -> dict:
        return self.kube.create(
            PODS,
            ns,
            {
                "metadata": {"name": name},
                "spec": {
                    "serviceAccountName": sa,
                    "automountServiceAccountToken": False,
                    # never scheduled, so where a node runs (make e2e-node) no kubelet
                    # owns its status: tests set the phase themselves
                    "schedulingGates": [{"name": "agentaccess.io/phase-set-by-test"}],
                    "containers": [{"name": "agent", "image": "registry.example/agent:1"}],
                },
            },
        )

    def set_pod_phase(self, ns: str, name: str, phase: str) -> None:
        self.kube.merge_patch(PODS, ns, name, {"status": {"phase": phase}}, "status")

    def policy(
        self, ns: str, name: str, subjects: list[tuple[str, str]], rules: list[dict], **spec: Any
    ) -> dict:
        body = {
            "apiVersion": "agentaccess.io/v1alpha1",
            "kind": "AccessPolicy",
            "metadata": {"name": name},
            "spec": {
                "subjects": [{"namespace": n, "serviceAccount": s} for n, s in subjects],
                "rules": rules,
                **spec,
            },
        }
        return self.kube.create(ACCESS_POLICIES, ns, body)

    def cluster_policy(
        self,
        name: str,
        subjects: list[tuple[str, str]],
        rules: list[dict],
        selector: dict,
        **spec: Any,
    ) -> dict:
        body = {
            "apiVersion": "agentaccess.io/v1alpha1",
            "kind": "ClusterAccessPolicy",
            "metadata": {"name": name},
            "spec": {
                "subjects": [{"namespace": n, "serviceAccount": s} for n, s in subjects],
                "rules": rules,
                "namespaceSelector": selector,
                **spec,
            },
        }
        return self.kube.create(CLUSTER_ACCESS_POLICIES, None, body)

    def task(self, ns: str, name: str, agent: str, access: list[dict], **spec: Any) -> dict:
        body = {
            "apiVersion": "agentaccess.io/v1alpha1",
            "kind": "AgentTask",
            "metadata": {"name": name},
            "spec": {
                "agent": agent,
                "intent": spec.pop("intent", f"integration test {name}"),
                "access": access,
                **spec,
            },
        }
        return self.kube.create(AGENT_TASKS, ns, body)

    def get_task(self, ns: str, name: str) -> dict | None:
        return self.kube.get(AGENT_TASKS, ns, name)

    def wait_phase(self, ns: str, name: str, phases: set[str] | str, timeout: float = 10) -> dict:
        wanted = {phases} if isinstance(phases, str) else phases

        def check():
            task = self.get_task(ns, name)
            return task if task and (task.get("status") or {}).get("phase") in wanted else None

        return wait_for(check, timeout, what=f"{ns}/{name} in {wanted}")

    def token(self, task: dict) -> str:
        ns = task["metadata"]["namespace"]
        secret = self.kube.get(SECRETS, ns, task["status"]["tokenSecretName"])
        token = base64.b64decode(secret["data"]["token"]).decode()
        SEEN_TOKENS.append(token)
        return token

    def task_objects(self, task: dict) -> list[str]:
        """Every object of the task's grant that still exists, as kind/ns/name."""
        uid = task["metadata"]["uid"]
        selector = f"agentaccess.io/task-uid={uid}"
        left = []
        for res in (ROLE_BINDINGS, ROLES, SERVICE_ACCOUNTS, SECRETS):
            for obj in self.kube.list(res, None, label_selector=selector):
                m = obj["metadata"]
                left.append(f"{res.plural}/{m['namespace']}/{m['name']}")
        return left

    def allow(self, ns: str, name: str, users: list[str], resources: list[str], verbs: list[str],
              group: str = "agentaccess.io") -> None:  # fmt: skip
        """A Role in `ns` with one rule, bound to these users (people the tests act as)."""
        rbac = "rbac.authorization.k8s.io"
        rule = {"apiGroups": [group], "resources": resources, "verbs": verbs}
        self.kube.create(ROLES, ns, {"metadata": {"name": name}, "rules": [rule]})
        self.kube.create(
            ROLE_BINDINGS,
            ns,
            {
                "metadata": {"name": name},
                "roleRef": {"apiGroup": rbac, "kind": "Role", "name": name},
                "subjects": [{"apiGroup": rbac, "kind": "User", "name": u} for u in users],
            },
        )

    def events(self, ns: str, name: str) -> list[dict]:
        from agent_access.kube import EVENTS

        return [e for e in self.kube.list(EVENTS, ns) if e["involvedObject"]["name"] == name]


def can(
    kube: Kube,
    verb: str,
    resource: str,
    ns: str,
    group: str = "",
    subresource: str = "",
    name: str = "",
) -> bool:
    """SelfSubjectAccessReview made with the client's own credentials."""
    attrs = {"namespace": ns, "verb": verb, "group": group, "resource": resource}
    if subresource:
        attrs["subresource"] = subresource
    if name:
        attrs["name"] = name
    review = kube.request(
        "POST",
        "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
        body={
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": attrs},
        },
    )
    return bool(review["status"].get("allowed"))


def list_pods_status(kube: Kube, ns: str) -> int:
    return status_code(lambda: kube.list(PODS, ns))


class OperatorProcess:
    """`agent-access-operator run` as a child process, logs captured for inspection."""

    #: Every operator a test started, so the token-leak scan reads all their logs.
    everyone: ClassVar[list[OperatorProcess]] = []

    def __init__(self, kubeconfig: str, workdir: Path, env: dict[str, str] | None = None):
        self.kubeconfig = kubeconfig
        self.extra_env = env or {}
        self.workdir = workdir
        self.port = free_port()
        self.audit_file = workdir / "audit.jsonl"
        self.proc: subprocess.Popen | None = None
        self.runs = 0
        OperatorProcess.everyone.append(self)

    @property
    def stdout_path(self) -> Path:
        return self.workdir / f"operator-{self.runs}.out"

    def start(self, extra: list[str] | None = None, wait: float = 30) -> None:
        self.runs += 1
        env = dict(os.environ, KUBECONFIG=self.kubeconfig, PYTHONUNBUFFERED="1", **self.extra_env)
        exe = Path(sys.executable).with_name("agent-access-operator")
        out_path = self.workdir / f"operator-{self.runs}.out"
        err_path = self.workdir / f"operator-{self.runs}.err"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [
                    str(exe),
                    "run",
                    "--metrics-port",
                    str(self.port),
                    "--metrics-host",
                    "127.0.0.1",
                    "--audit-file",
                    str(self.audit_file),
                    *(extra or []),
                ],
                stdout=out,
                stderr=err,
                env=env,
                start_new_session=True,
            )
        if wait:
            wait_for(self.ready, wait, 0.1, "operator /readyz")

    def ready(self) -> bool:
        import urllib.request

        if self.proc and self.proc.poll() is not None:
            raise AssertionError(f"operator exited: {self.logs()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def logs(self) -> str:
        text = ""
        for path in sorted(self.workdir.glob("operator-*.*")):
            text += path.read_text(errors="replace")
        return text

    def audit_lines(self) -> list[dict]:
        if not self.audit_file.exists():
            return []
        return [json.loads(line) for line in self.audit_file.read_text().splitlines() if line]

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as r:
            return r.read().decode()


#: name -> list of seconds; printed at the end of the run (tests/conftest.py).
TIMINGS: dict[str, list[float]] = {}
#: What the run was tested against, printed at the end of the run.
FACTS: dict[str, str] = {}


def record_timing(name: str, seconds: float) -> None:
    TIMINGS.setdefault(name, []).append(seconds)


def poll_status(fn: Callable[[], int], wanted: set[int], timeout: float, interval=0.01) -> float:
    """Call fn until it returns a status in `wanted`; return seconds taken."""
    started = time.monotonic()
    while True:
        code = fn()
        if code in wanted:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"still {code} after {timeout}s (wanted {sorted(wanted)})")
        time.sleep(interval)
