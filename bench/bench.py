#!/usr/bin/env python3
"""Benchmarks: how fast access is granted and how fast it dies, against the raw API floor.

    bench/bench.py            full: 200 grants, 20 samples per trigger, 1,000-task scale
    bench/bench.py --quick    a couple of minutes, for routine use (no scale run)

Starts its own local control plane; the operator runs as a separate process.
Writes bench/results/latest.json, bench/results/latencies.png and the table in
docs/benchmarks.md. Never fails on speed: targets are reported, not asserted.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import re
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "hack")]

import controlplane  # noqa: E402
from tests.integration.cluster import (  # noqa: E402
    OperatorProcess,
    World,
    admin,
    apply_crds,
    as_token,
    list_pods_status,
)

from agent_access.kube import (  # noqa: E402
    ACCESS_POLICIES,
    AGENT_TASKS,
    PODS,
    ROLE_BINDINGS,
    ROLES,
    SECRETS,
    SERVICE_ACCOUNTS,
    Kube,
)
from agent_access.runtime import parse_time  # noqa: E402

READ = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]
LABEL = re.compile(r'(\w+)="([^"]*)"')
#: Seconds between requests while waiting for the token to work or be refused.
POLL = float(os.environ.get("BENCH_POLL", "0.01"))
#: Seconds between a grant being usable and its trigger.
SETTLE = float(os.environ.get("BENCH_SETTLE", "0.3"))
TRIGGERS = ("ttl", "pod_succeeded", "pod_deleted", "cancel", "task_deleted", "policy_changed")
TARGETS = {
    "grant_p99_s": 0.5,
    "revoke_403_p99_s": 1.0,
    "grant_floor_ratio": 2.0,
    "rss_mb_at_1000": 150,
    "policy_revoke_1000_s": 10,
}


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def wait_status(fn, wanted: set[int], timeout: float, interval: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if fn() in wanted:
            return time.monotonic()
        time.sleep(interval)
    raise TimeoutError(f"no {wanted} within {timeout}s")


class Bench:
    def __init__(self, quick: bool):
        self.quick = quick
        self.n_grants = 30 if quick else 200
        self.k = 5 if quick else 20
        self._controlplane = controlplane.temporary("aao-bench-")
        self.kubeconfig = self._controlplane.__enter__()
        apply_crds(self.kubeconfig)
        self._opdir = Path(tempfile.mkdtemp(prefix="aao-bench-op-"))
        self.op = OperatorProcess(self.kubeconfig, self._opdir)
        self.op.start()
        self.world = World(admin(self.kubeconfig), self.kubeconfig)
        self.kube: Kube = self.world.kube
        self.agents = self.world.namespace("bench-agents")
        self.target = self.world.namespace("bench-target")
        self.world.service_account(self.agents, "bot")
        self.world.policy(self.target, "read", [(self.agents, "bot")], READ)
        self.seq = 0

    def close(self) -> None:
        self.op.stop()
        self._controlplane.__exit__(None, None, None)
        shutil.rmtree(self._opdir, ignore_errors=True)

    def name(self, prefix: str) -> str:
        self.seq += 1
        return f"{prefix}-{self.seq}"

    def token_of(self, task: dict) -> str:
        secret = self.kube.get(
            SECRETS, task["metadata"]["namespace"], task["status"]["tokenSecretName"]
        )
        return base64.b64decode(secret["data"]["token"]).decode()

    def wait_active(self, ns: str, name: str, timeout: float = 20) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            task = self.kube.get(AGENT_TASKS, ns, name)
            if task and (task.get("status") or {}).get("phase") == "Active":
                return task
            if task and (task.get("status") or {}).get("phase") not in (None, "Pending"):
                raise RuntimeError(f"{name}: {task['status']}")
            time.sleep(0.002)
        raise TimeoutError(name)

    # -- grant -------------------------------------------------------------------------

    def grant_once(self, agent: str = "bot", **spec) -> tuple[float, dict, Kube]:
        name = self.name("g")
        start = time.monotonic()
        self.world.task(
            self.agents, name, agent, [{"namespace": self.target, "rules": READ}], **spec
        )
        task = self.wait_active(self.agents, name)
        client = as_token(self.kubeconfig, self.token_of(task))
        wait_status(lambda: list_pods_status(client, self.target), {200}, 10, POLL)
        return time.monotonic() - start, task, client

    def bench_grants(self) -> list[float]:
        out = []
        for _ in range(self.n_grants):
            seconds, task, _ = self.grant_once()
            out.append(seconds)
            self.kube.delete(AGENT_TASKS, self.agents, task["metadata"]["name"])
        return out

    # -- the floor: the same calls made directly ---------------------------------------

    def floor_once(self) -> tuple[float, float]:
        ns, name = self.agents, self.name("floor")
        start = time.monotonic()
        self.kube.create(SERVICE_ACCOUNTS, ns, {"metadata": {"name": name}})
        self.kube.create(ROLES, self.target, {"metadata": {"name": name}, "rules": READ})
        self.kube.create(
            ROLE_BINDINGS,
            self.target,
            {
                "metadata": {"name": name},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}],
            },
        )
        secret = self.kube.create(SECRETS, ns, {"metadata": {"name": name}, "data": {}})
        token, _ = self.kube.request_token(
            ns,
            name,
            600,
            (),
            {"apiVersion": "v1", "kind": "Secret", "name": name, "uid": secret["metadata"]["uid"]},
        )
        self.kube.merge_patch(
            SECRETS, ns, name, {"data": {"token": base64.b64encode(token.encode()).decode()}}
        )
        client = as_token(self.kubeconfig, token)
        wait_status(lambda: list_pods_status(client, self.target), {200}, 10, POLL)
        grant = time.monotonic() - start
        start = time.monotonic()
        self.kube.delete(ROLE_BINDINGS, self.target, name)
        wait_status(lambda: list_pods_status(client, self.target), {401, 403}, 10, POLL)
        revoke = time.monotonic() - start
        self.kube.delete(SERVICE_ACCOUNTS, ns, name)
        self.kube.delete(SECRETS, ns, name)
        self.kube.delete(ROLES, self.target, name)
        return grant, revoke

    # -- revocation -------------------------------------------------------------------------

    def revoke_once(self, trigger: str, pollers: list) -> float:
        spec: dict = {}
        agent = "bot"
        if trigger == "ttl":
            spec["ttl"] = "1s"
        if trigger in ("pod_succeeded", "pod_deleted"):
            pod = self.name("pod")
            self.world.pod(self.agents, pod, "bot")
            spec["podName"] = pod
        if trigger == "policy_changed":
            agent = self.name("bot")
            self.world.service_account(self.agents, agent)
            self.world.policy(self.target, agent, [(self.agents, agent)], READ)
        _, task, client = self.grant_once(agent, **spec)
        name = task["metadata"]["name"]
        if trigger == "ttl":
            expires = parse_time(task["status"]["expiresAt"]).timestamp()
            time.sleep(max(0.0, expires - time.time() - 0.02))
            start = time.monotonic() - (time.time() - expires)  # measured from expiresAt
        else:
            # Let the grant settle: a trigger arriving while the task's own grant handler
            # is still finishing (~0.1 s) waits for it (kopf runs one handler per object
            # at a time). Real triggers come seconds or minutes after a grant.
            time.sleep(SETTLE)
            start = time.monotonic()
            if trigger == "pod_succeeded":
                self.world.set_pod_phase(self.agents, spec["podName"], "Succeeded")
            elif trigger == "pod_deleted":
                self.kube.delete(PODS, self.agents, spec["podName"])
            elif trigger == "cancel":
                self.kube.merge_patch(AGENT_TASKS, self.agents, name, {"spec": {"cancel": True}})
            elif trigger == "task_deleted":
                self.kube.delete(AGENT_TASKS, self.agents, name)
            elif trigger == "policy_changed":
                self.kube.merge_patch(
                    ACCESS_POLICIES,
                    self.target,
                    agent,
                    {
                        "spec": {
                            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]
                        }
                    },
                )
        t403 = wait_status(lambda: list_pods_status(client, self.target), {401, 403}, 10, POLL)

        def poll_401(result: dict = {}) -> None:  # noqa: B006
            result["t401"] = (
                wait_status(lambda: list_pods_status(client, self.target), {401}, 30, 0.05) - start
            )

        box: dict = {}
        thread = threading.Thread(target=poll_401, args=(box,), daemon=True)
        thread.start()
        pollers.append((trigger, thread, box))
        return t403 - start

    def bench_revocations(self) -> tuple[dict, dict]:
        r403: dict[str, list[float]] = {t: [] for t in TRIGGERS}
        r401: dict[str, list[float]] = {t: [] for t in TRIGGERS}
        pollers: list = []
        for trigger in TRIGGERS:
            for _ in range(self.k):
                r403[trigger].append(self.revoke_once(trigger, pollers))
        for trigger, thread, box in pollers:
            thread.join(40)
            if "t401" in box:
                r401[trigger].append(box["t401"])
        return r403, r401

    # -- scale ------------------------------------------------------------------------------

    def apiserver_requests(self) -> float:
        """Non-watch resource requests the API server served, except its own (leases,
        OpenAPI) and non-resource URLs such as the /metrics scrape itself."""
        text = self.kube.api.call_api(
            *self.kube.api.param_serialize(
                method="GET", resource_path="/metrics", auth_settings=["BearerToken"]
            )
        ).read()
        total = 0.0
        for line in text.decode().splitlines():
            if not line.startswith("apiserver_request_total{"):
                continue
            labels = dict(LABEL.findall(line.split("}", 1)[0]))
            if labels.get("verb") == "WATCH" or labels.get("resource") in ("", "leases"):
                continue
            total += float(line.rsplit(" ", 1)[1])
        return total

    def quiesce(self, limit: float = 90) -> None:
        """Wait until the operator has finished its trailing work (quiet for 3 s)."""
        deadline = time.monotonic() + limit
        last = self.apiserver_requests()
        while time.monotonic() < deadline:
            time.sleep(3)
            now = self.apiserver_requests()
            if now - last <= 1:
                return
            last = now

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.op.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.op.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def bench_scale(self, n: int = 1000) -> dict:
        ns = self.world.namespace("scale-target")
        self.world.policy(ns, "read", [(self.agents, "bot")], READ)
        names = [f"scale-{i}" for i in range(n)]
        requests_before, cpu_before = self.apiserver_requests(), self.cpu_seconds()
        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(
                pool.map(
                    lambda nm: self.world.task(
                        self.agents, nm, "bot", [{"namespace": ns, "rules": READ}], ttl="1h"
                    ),
                    names,
                )
            )

        def active() -> int:
            return sum(
                1
                for t in self.kube.list(AGENT_TASKS, self.agents)
                if t["metadata"]["name"].startswith("scale-")
                and (t.get("status") or {}).get("phase") == "Active"
            )

        while active() < n and time.monotonic() - started < 600:
            time.sleep(1)
        all_active_s = time.monotonic() - started
        self.quiesce()  # the operator's trailing work belongs to the grants
        requests_after, cpu_after = self.apiserver_requests(), self.cpu_seconds()
        # the bench client itself made n creates and the list polls above
        polls = int(all_active_s) + 2
        per_grant = (requests_after - requests_before - n - polls) / n
        rss = self.rss_mb()
        idle_before = self.apiserver_requests()
        time.sleep(30)
        idle_rate = (self.apiserver_requests() - idle_before) / 30
        started = time.monotonic()
        self.kube.merge_patch(
            ACCESS_POLICIES,
            ns,
            "read",
            {"spec": {"rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]}},
        )
        while (
            self.kube.list(ROLE_BINDINGS, ns, "app.kubernetes.io/managed-by=agent-access-operator")
            and time.monotonic() - started < 120
        ):
            time.sleep(0.05)
        revoke_all = time.monotonic() - started
        return {
            "tasks": n,
            "all_active_s": round(all_active_s, 2),
            "grants_per_s": round(n / all_active_s, 1),
            "operator_cpu_s_for_grants": round(cpu_after - cpu_before, 2),
            "rss_mb_at_1000": round(rss, 1),
            "api_requests_per_grant": round(per_grant, 2),
            "idle_api_requests_per_s": round(max(0.0, idle_rate), 3),
            "policy_revoke_1000_s": round(revoke_all, 2),
        }


def summarize(values: list[float]) -> dict:
    return {
        "n": len(values),
        "p50": pct(values, 0.5),
        "p95": pct(values, 0.95),
        "p99": pct(values, 0.99),
        "max": max(values) if values else None,
    }


def plot(grants, floor_grants, r403, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    axes[0].hist([g * 1000 for g in grants], bins=30, alpha=0.7, label="operator")
    axes[0].hist([g * 1000 for g in floor_grants], bins=30, alpha=0.7, label="floor (raw API)")
    axes[0].set_title("Grant: created -> token usable")
    axes[0].set_xlabel("ms")
    axes[0].legend()
    axes[1].boxplot([[v * 1000 for v in r403[t]] for t in TRIGGERS], tick_labels=list(TRIGGERS))
    axes[1].set_title("Revocation: trigger -> first 403")
    axes[1].set_ylabel("ms")
    axes[1].tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_markdown(result: dict, path: Path) -> None:
    s, m = result["summary"], result["machine"]
    ms = lambda v: "n/a" if v is None else f"{v * 1000:.0f} ms"  # noqa: E731
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `make {'bench-quick' if s['mode'] == 'quick' else 'bench'}` on "
        f"{result['date']} (mode `{s['mode']}`). Raw numbers: `bench/results/latest.json`; "
        "distributions: `bench/results/latencies.png`.",
        "",
        f"Machine: {m['cores']} cores, {m['memory_gb']} GB, {m['platform']}; Python "
        f"{m['python']}; kube-apiserver {m['kube_apiserver']}, etcd {m['etcd']} (local, "
        "no kubelet). The operator runs as a separate process.",
        "",
        "## Grant: AgentTask created -> first allowed request with its token",
        "",
        "| | p50 | p95 | p99 | n |",
        "|---|---|---|---|---|",
        f"| operator | {ms(result['grant']['p50'])} | {ms(result['grant']['p95'])} | "
        f"{ms(result['grant']['p99'])} | {result['grant']['n']} |",
        f"| floor (same calls, raw API) | {ms(result['floor_grant']['p50'])} | "
        f"{ms(result['floor_grant']['p95'])} | {ms(result['floor_grant']['p99'])} | "
        f"{result['floor_grant']['n']} |",
        "",
        f"Operator / floor (p50): **{s['grant_floor_ratio']:.2f}** (target <= 2). "
        f"Revoke: operator cancel / floor RoleBinding delete (p50): "
        f"**{s['revoke_floor_ratio']:.2f}**.",
        "",
        "## Revocation: trigger -> first refused request (403) and -> token no longer "
        "authenticates (401)",
        "",
        "TTL expiry is measured from `expiresAt`. 401 includes the API server's ~10 s "
        "authentication cache, which no flag changes. Requests are polled every "
        f"{POLL * 1000:.0f} ms. Triggers other than TTL fire {SETTLE} s after the grant is "
        "usable: a trigger that arrives while the task's own grant handler is still "
        "finishing (about 0.1 s after the token works) waits for it, because kopf runs one "
        "handler per object at a time.",
        "",
        "| trigger | 403 p50 | 403 p99 | 401 p50 | 401 p99 | n |",
        "|---|---|---|---|---|---|",
    ]
    for t in TRIGGERS:
        a, b = result["revoke_403"][t], result["revoke_401"][t]
        lines.append(
            f"| {t} | {ms(a['p50'])} | {ms(a['p99'])} | {ms(b['p50'])} | "
            f"{ms(b['p99'])} | {a['n']} |"
        )
    lines += ["", "## Scale", ""]
    if result.get("scale"):
        sc = result["scale"]
        lines += [
            "| measure | value | target |",
            "|---|---|---|",
            f"| tasks Active at once | {sc['tasks']} | |",
            f"| time to grant all | {sc['all_active_s']} s ({sc['grants_per_s']}/s) | |",
            f"| operator RSS at 1,000 active | {sc['rss_mb_at_1000']} MB | <= 150 MB |",
            f"| API requests per grant (operator, incl. kopf) | {sc['api_requests_per_grant']} | |",
            f"| API requests/s while idle (non-watch) | {sc['idle_api_requests_per_s']} | 0 |",
            f"| revoke 1,000 after one policy change | {sc['policy_revoke_1000_s']} s | <= 10 s |",
            f"| operator CPU to grant 1,000 | {sc['operator_cpu_s_for_grants']} s | |",
        ]
    else:
        lines.append("Not run in quick mode (`make bench` runs it).")
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for key, target in TARGETS.items():
        value = s.get(key)
        if isinstance(value, dict):
            value = max(v for v in value.values() if v is not None)
        met = "n/a" if value is None else ("yes" if value <= target else "**no**")
        shown = "n/a" if value is None else f"{value:.3f}"
        lines.append(f"| {key} <= {target} | {shown} | {met} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--scale-only",
        type=int,
        metavar="N",
        help="only the scale run with N tasks; prints, writes nothing",
    )
    args = parser.parse_args()
    bench = Bench(args.quick)
    if args.scale_only:
        try:
            print(json.dumps(bench.bench_scale(args.scale_only), indent=2))
        finally:
            bench.close()
        return 0
    try:
        print(f"bench: grants x{bench.n_grants}", flush=True)
        grants = bench.bench_grants()
        print("bench: floor", flush=True)
        floors = [bench.floor_once() for _ in range(bench.n_grants)]
        print(f"bench: revocations x{bench.k} per trigger", flush=True)
        r403, r401 = bench.bench_revocations()
        scale = None
        if not args.quick:
            print("bench: scale (1,000 tasks)", flush=True)
            scale = bench.bench_scale()
        version = bench.kube.request("GET", "/version")["gitVersion"]
    finally:
        bench.close()
    floor_grant = [f[0] for f in floors]
    floor_revoke = [f[1] for f in floors]
    result = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "kube_apiserver": version,
            "etcd": Path(controlplane.find_binary("etcd")).parent.name,
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
        },
        "grant": summarize(grants),
        "floor_grant": summarize(floor_grant),
        "floor_revoke": summarize(floor_revoke),
        "revoke_403": {t: summarize(v) for t, v in r403.items()},
        "revoke_401": {t: summarize(v) for t, v in r401.items()},
        "scale": scale,
    }
    result["summary"] = {
        "mode": "quick" if args.quick else "full",
        "grant_p50_s": result["grant"]["p50"],
        "grant_p99_s": result["grant"]["p99"],
        "grant_floor_ratio": result["grant"]["p50"] / result["floor_grant"]["p50"],
        "revoke_floor_ratio": statistics.median(r403["cancel"]) / statistics.median(floor_revoke),
        "revoke_403_p99_s": {t: result["revoke_403"][t]["p99"] for t in TRIGGERS},
        "revoke_401_p99_s": {t: result["revoke_401"][t]["p99"] for t in TRIGGERS},
        "rss_mb_at_1000": scale["rss_mb_at_1000"] if scale else None,
        "policy_revoke_1000_s": scale["policy_revoke_1000_s"] if scale else None,
    }
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(grants, floor_grant, r403, out / "latencies.png")
    write_markdown(result, ROOT / "docs" / "benchmarks.md")
    print(json.dumps(result["summary"], indent=2))
    return 0


if __name__ == "__main__":
    # SIGTERM (e.g. from `timeout`) exits normally, so the control plane is torn down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
