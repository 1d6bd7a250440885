"""Benchmark of the enforcement point: the operator as the API server's authorization
webhook (a control plane of its own, AUTHZ_WEBHOOK=1).

- Added latency: a per-task identity and a plain ServiceAccount with the same RBAC
  each make calls at a fixed rate (open loop: requests are sent on schedule whether
  or not earlier ones answered) of 50, 200 and 1,000 calls/s; the per-task one goes
  through the webhook, the plain one never does. Added = per-task minus plain, at
  p50 and p99; also the operator's own time per review.
- Others' cost: the plain identity's calls are never sent to the webhook (the
  operator's review count does not move; the API server counts them as excluded by
  the match condition) and its latency with the operator down is the same.
- Trigger to refused: each trigger, then a call every POLL seconds until 403.

Used by bench/bench.py (`authz` in latest.json) and alone: bench/bench.py --only authz.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp

from agent_access.kube import (
    ACCESS_POLICIES,
    AGENT_TASKS,
    NAMESPACES,
    PODS,
    ROLE_BINDINGS,
    ROLES,
    SECRETS,
    SERVICE_ACCOUNTS,
    Kube,
    KubeError,
)

RATES = (50, 200, 1000)
READ = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]
MAPS = {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list"], "recheck": True}
TRIGGERS = ("cancel", "task_deleted", "suspended", "pod_deleted", "policy_changed_recheck", "ttl")


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def stats(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "p50": pct(values, 0.5), "p99": pct(values, 0.99),
            "max": max(values) if values else None}  # fmt: skip


async def _load(url: str, token: str, ca: str, rate: int, seconds: float) -> dict[str, Any]:
    """Open-loop load: request i is sent at start + i/rate; latency from its send time."""
    ctx = ssl.create_default_context(cafile=ca)
    headers = {"Authorization": f"Bearer {token}"}
    latencies: list[float] = []
    codes: dict[int, int] = {}
    connector = aiohttp.TCPConnector(ssl=ctx, limit=256)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def one(at: float) -> None:
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sent = time.perf_counter()
            async with session.get(url) as resp:
                await resp.read()
                codes[resp.status] = codes.get(resp.status, 0) + 1
            latencies.append(time.perf_counter() - max(sent, at))

        # warm the connections first (TLS handshakes are not what is measured)
        await asyncio.gather(*(one(time.perf_counter()) for _ in range(min(rate // 10, 32) + 1)))
        latencies.clear()
        codes.clear()
        start = time.perf_counter() + 0.05
        n = int(rate * seconds)
        began = time.perf_counter()
        await asyncio.gather(*(one(start + i / rate) for i in range(n)))
        took = time.perf_counter() - began
    return {"latencies": latencies, "codes": codes, "achieved_per_s": n / took}


class AuthzBench:
    def __init__(self, quick: bool):
        import sys

        root = Path(__file__).resolve().parents[1]
        sys.path[:0] = [str(root), str(root / "hack")]
        import controlplane
        from tests.integration.cluster import OperatorProcess, admin, apply_crds
        from tests.integration.test_authz_webhook import authz_args

        self.quick = quick
        self.seconds = 3.0 if quick else 10.0
        self.k = 3 if quick else 10
        self._cp = controlplane.temporary("aao-bench-authz-", {"authz": True})
        self.kubeconfig = self._cp.__enter__()
        apply_crds(self.kubeconfig)
        self.kube: Kube = admin(self.kubeconfig)
        self._opdir = Path(tempfile.mkdtemp(prefix="aao-bench-authz-op-"))
        self.op = OperatorProcess(self.kubeconfig, self._opdir)
        self._args = authz_args(self.kubeconfig)
        self.op.start(self._args)
        import yaml

        cfg = yaml.safe_load(Path(self.kubeconfig).read_text())
        self.server = cfg["clusters"][0]["cluster"]["server"]
        self.ca = str(Path(self.kubeconfig).parent / "ca.crt")
        ca_data = cfg["clusters"][0]["cluster"]["certificate-authority-data"]
        Path(self.ca).write_bytes(base64.b64decode(ca_data))
        self.seq = 0

    def close(self) -> None:
        self.op.stop()
        self._cp.__exit__(None, None, None)

    # -- helpers ---------------------------------------------------------------------

    def name(self, prefix: str) -> str:
        self.seq += 1
        return f"{prefix}-{self.seq}"

    def scene(self, **policy: Any) -> str:
        ns = self.name("authz-bench")
        self.kube.create(NAMESPACES, None, {"metadata": {"name": ns}})
        self.kube.create(SERVICE_ACCOUNTS, ns, {"metadata": {"name": "bot"}})
        self.kube.create(
            ACCESS_POLICIES, ns,
            {"apiVersion": "agentaccess.io/v1alpha1", "kind": "AccessPolicy",
             "metadata": {"name": "p"},
             "spec": {"subjects": [{"namespace": ns, "serviceAccount": "bot"}],
                      "rules": [*READ, MAPS], **policy}},
        )  # fmt: skip
        return ns

    def grant(self, ns: str, ttl: str = "15m", pod: str | None = None,
              rules: list | None = None) -> tuple[dict, str]:  # fmt: skip
        name = self.name("t")
        spec: dict[str, Any] = {"agent": "bot", "intent": "benchmark", "ttl": ttl,
                                "access": [{"namespace": ns, "rules": rules or READ}]}  # fmt: skip
        if pod:
            spec["podName"] = pod
        self.kube.create(AGENT_TASKS, ns, {"apiVersion": "agentaccess.io/v1alpha1",
                                           "kind": "AgentTask", "metadata": {"name": name},
                                           "spec": spec})  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            task = self.kube.get(AGENT_TASKS, ns, name)
            if task and (task.get("status") or {}).get("phase") == "Active":
                secret = self.kube.get(SECRETS, ns, task["status"]["tokenSecretName"])
                return task, base64.b64decode(secret["data"]["token"]).decode()
            time.sleep(0.005)
        raise TimeoutError(name)

    def plain_token(self, ns: str) -> str:
        """A ServiceAccount that is no task's, with the same RBAC (list pods)."""
        rbac = "rbac.authorization.k8s.io"
        self.kube.create(SERVICE_ACCOUNTS, ns, {"metadata": {"name": "plain"}})
        self.kube.create(ROLES, ns, {"metadata": {"name": "plain"}, "rules": READ})
        self.kube.create(ROLE_BINDINGS, ns, {
            "metadata": {"name": "plain"},
            "roleRef": {"apiGroup": rbac, "kind": "Role", "name": "plain"},
            "subjects": [{"kind": "ServiceAccount", "name": "plain", "namespace": ns}],
        })  # fmt: skip
        token, _ = self.kube.request_token(ns, "plain", 3600, (), None)
        return token

    def load(self, token: str, ns: str, rate: int) -> dict[str, Any]:
        url = f"{self.server}/api/v1/namespaces/{ns}/pods?resourceVersion=0"
        return asyncio.run(_load(url, token, self.ca, rate, self.seconds))

    def reviews(self) -> float:
        total = 0.0
        for line in self.op.metrics().splitlines():
            if line.startswith("agentaccess_authz_calls_total{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def apiserver_metric(self, prefix: str) -> float:
        import os
        import subprocess
        import sys

        kubectl = Path(sys.executable).with_name("kubectl")
        text = subprocess.run(
            [str(kubectl), "get", "--raw", "/metrics"], capture_output=True, text=True,
            check=True, env=dict(os.environ, KUBECONFIG=self.kubeconfig),
        ).stdout  # fmt: skip
        total = 0.0
        for line in text.splitlines():
            if line.startswith(prefix):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def review_seconds(self) -> tuple[float, float]:
        """(sum, count) of the operator's own time per review."""
        s = c = 0.0
        for line in self.op.metrics().splitlines():
            if line.startswith("agentaccess_authz_latency_seconds_sum"):
                s = float(line.rsplit(" ", 1)[1])
            elif line.startswith("agentaccess_authz_latency_seconds_count"):
                c = float(line.rsplit(" ", 1)[1])
        return s, c

    # -- added latency ---------------------------------------------------------------

    def bench_latency(self) -> dict[str, Any]:
        ns = self.scene()
        _, token = self.grant(ns, ttl="1h")
        plain = self.plain_token(ns)
        out: dict[str, Any] = {}
        for rate in RATES:
            s0, c0 = self.review_seconds()
            task = self.load(token, ns, rate)
            s1, c1 = self.review_seconds()
            other = self.load(plain, ns, rate)
            row = {
                "per_task": stats(task["latencies"]), "plain": stats(other["latencies"]),
                "per_task_codes": task["codes"], "plain_codes": other["codes"],
                "achieved_per_s": round(task["achieved_per_s"], 1),
                "operator_review_mean_ms": (s1 - s0) / (c1 - c0) * 1000 if c1 > c0 else None,
            }  # fmt: skip
            for q in ("p50", "p99"):
                a, b = row["per_task"][q], row["plain"][q]
                row[f"added_{q}_ms"] = (a - b) * 1000 if a is not None and b is not None else None
            out[str(rate)] = row
            print(f"bench authz: {rate}/s added p50 {row['added_p50_ms']:.2f} ms "
                  f"p99 {row['added_p99_ms']:.2f} ms", flush=True)  # fmt: skip
        return out

    def bench_others(self) -> dict[str, Any]:
        """Requests of other identities never reach the webhook; with the operator down
        they are served as fast as with it up."""
        ns = self.scene()
        plain = self.plain_token(ns)
        before = self.reviews()
        excluded0 = self.apiserver_metric(
            "apiserver_authorization_match_condition_exclusions_total"
        )
        up = self.load(plain, ns, 200)
        reviewed = self.reviews() - before
        excluded = (
            self.apiserver_metric("apiserver_authorization_match_condition_exclusions_total")
            - excluded0
        )
        self.op.kill()
        down = self.load(plain, ns, 200)
        self.op.start(self._args)
        return {
            "calls": len(up["latencies"]),
            "reviews_sent_to_webhook": reviewed,
            "excluded_by_match_condition": excluded,
            "plain_operator_up": stats(up["latencies"]),
            "plain_operator_down": stats(down["latencies"]),
            "codes_operator_down": down["codes"],
        }

    # -- trigger to refused ----------------------------------------------------------

    def _poll_403(self, client: Kube, ns: str, what: str, started: list[float],
                  result: dict[str, float]) -> None:  # fmt: skip
        path = f"/api/v1/namespaces/{ns}/{what}"
        while "t" not in result:
            try:
                client.request("GET", path, query=[("resourceVersion", "0")], resource=what)
            except KubeError as exc:
                if exc.status in (401, 403, 500) and started:
                    result["t"] = time.monotonic() - started[0]
                    return
            time.sleep(0.001)

    def client(self, token: str) -> Kube:
        import kubernetes

        config = kubernetes.client.Configuration()
        config.host = self.server
        config.ssl_ca_cert = self.ca
        config.api_key = {"BearerToken": token}
        config.api_key_prefix = {"BearerToken": "Bearer"}
        return Kube(kubernetes.client.ApiClient(config), retries=0)

    def trigger_once(self, trigger: str) -> float:
        ns = self.scene()
        pod = None
        if trigger == "pod_deleted":
            pod = "agent"
            self.kube.create(PODS, ns, {"metadata": {"name": pod}, "spec": {
                "serviceAccountName": "bot", "automountServiceAccountToken": False,
                "schedulingGates": [{"name": "agentaccess.io/bench"}],
                "containers": [{"name": "a", "image": "registry.example/a:1"}]}})  # fmt: skip
        rules = [*READ, {k: v for k, v in MAPS.items() if k != "recheck"}]
        task, token = self.grant(ns, ttl="2s" if trigger == "ttl" else "15m", pod=pod, rules=rules)
        client = self.client(token)
        what = "configmaps" if trigger == "policy_changed_recheck" else "pods"
        started: list[float] = []
        result: dict[str, float] = {}
        poller = threading.Thread(target=self._poll_403, args=(client, ns, what, started, result))
        name = task["metadata"]["name"]
        if trigger == "ttl":
            expires = task["status"]["expiresAt"]
            from datetime import UTC, datetime

            moment = datetime.strptime(expires, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
            started.append(time.monotonic() + (moment.timestamp() - time.time()))
            poller.start()
        else:
            time.sleep(0.2)
            poller.start()
            started.append(time.monotonic())
            if trigger == "cancel":
                self.kube.merge_patch(AGENT_TASKS, ns, name, {"spec": {"cancel": True}})
            elif trigger == "task_deleted":
                self.kube.delete(AGENT_TASKS, ns, name)
            elif trigger == "suspended":
                self.kube.merge_patch(SERVICE_ACCOUNTS, ns, "bot", {"metadata": {
                    "annotations": {"agentaccess.io/suspended": "true"}}})  # fmt: skip
            elif trigger == "pod_deleted":
                self.kube.delete(PODS, ns, "agent")
            elif trigger == "policy_changed_recheck":
                self.kube.merge_patch(ACCESS_POLICIES, ns, "p", {"spec": {"rules": READ}})
        poller.join(10)
        if "t" not in result:
            raise TimeoutError(f"{trigger}: no refusal within 10 s")
        return result["t"]

    def bench_triggers(self) -> dict[str, Any]:
        out = {}
        for trigger in TRIGGERS:
            samples = [self.trigger_once(trigger) for _ in range(self.k)]
            out[trigger] = stats(samples)
            print(f"bench authz: {trigger} -> refused p99 {out[trigger]['p99'] * 1000:.1f} ms",
                  flush=True)  # fmt: skip
        return out

    def run(self) -> dict[str, Any]:
        latency = self.bench_latency()
        others = self.bench_others()
        triggers = self.bench_triggers()
        return {"latency": latency, "others": others, "trigger_refused": triggers,
                "seconds_per_rate": self.seconds}  # fmt: skip
