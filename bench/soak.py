#!/usr/bin/env python3
"""Soak: tasks created, used and ended continuously for SOAK_SECONDS (default 600).

Starts its own local control plane and operator process. Every ~0.4 s a task is
created in one of four modes (TTL expiry, pod succeeds, cancel, task deleted),
its token is used, and it must end. Every 10 s it samples the operator's RSS,
active and overdue grants. At the end: no orphaned objects, overdue grants were
always 0, memory flat. Writes bench/results/soak.json.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
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
    AGENT_TASKS,
    PODS,
    ROLE_BINDINGS,
    ROLES,
    SECRETS,
    SERVICE_ACCOUNTS,
)

READ = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def gauge(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def main() -> int:
    seconds = float(os.environ.get("SOAK_SECONDS", "600"))
    with controlplane.temporary("aao-soak-") as kubeconfig:
        return soak(kubeconfig, seconds)


def soak(kubeconfig: str, seconds: float) -> int:
    apply_crds(kubeconfig)
    work = Path(tempfile.mkdtemp(prefix="aao-soak-op-"))
    op = OperatorProcess(kubeconfig, work)
    op.start()
    world = World(admin(kubeconfig), kubeconfig)
    agents, target = world.namespace("soak-agents"), world.namespace("soak-target")
    world.service_account(agents, "bot")
    world.policy(target, "read", [(agents, "bot")], READ)

    samples: list[dict] = []
    failures: list[str] = []
    counts = {"created": 0, "ended": 0, "modes": {}}
    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            if op.proc.poll() is not None:
                failures.append(f"the operator exited with {op.proc.returncode}")
                return
            try:
                text = op.metrics()
            except OSError as exc:
                failures.append(f"metrics unreachable: {exc}")
                stop.wait(10)
                continue
            samples.append(
                {
                    "t": round(time.monotonic() - started, 1),
                    "rss_mb": round(rss_mb(op.proc.pid), 1),
                    "active": gauge(text, "agentaccess_active_grants"),
                    "overdue": gauge(text, "agentaccess_overdue_grants"),
                }
            )
            stop.wait(10)

    def one(i: int) -> None:
        mode = ("ttl", "pod", "cancel", "delete")[i % 4]
        name = f"soak-{i}"
        spec: dict = {"ttl": f"{random.randint(2, 5)}s"} if mode == "ttl" else {}
        try:
            if mode == "pod":
                world.pod(agents, name, "bot")
                spec["podName"] = name
            world.task(agents, name, "bot", [{"namespace": target, "rules": READ}], **spec)
            task = world.wait_phase(agents, name, "Active", timeout=15)
            client = as_token(kubeconfig, world.token(task))
            if list_pods_status(client, target) != 200:
                failures.append(f"{name}: token not usable")
            time.sleep(random.uniform(0.2, 1.0))
            if mode == "pod":
                world.set_pod_phase(agents, name, "Succeeded")
            elif mode == "cancel":
                world.kube.merge_patch(AGENT_TASKS, agents, name, {"spec": {"cancel": True}})
            elif mode == "delete":
                world.kube.delete(AGENT_TASKS, agents, name)
            deadline = time.monotonic() + 12
            while list_pods_status(client, target) == 200:
                if time.monotonic() > deadline:
                    failures.append(f"{name} ({mode}): still usable 12 s after its trigger")
                    break
                time.sleep(0.05)
            if mode != "delete":
                world.wait_phase(agents, name, {"Expired", "Completed", "Cancelled"}, 15)
                world.kube.delete(AGENT_TASKS, agents, name)
            if mode == "pod":
                world.kube.delete(PODS, agents, name)
            counts["ended"] += 1
        except Exception as exc:  # recorded, the soak goes on
            failures.append(f"{name} ({mode}): {type(exc).__name__}: {exc}")
        counts["modes"][mode] = counts["modes"].get(mode, 0) + 1

    started = time.monotonic()
    threading.Thread(target=sampler, daemon=True).start()
    threads: list[threading.Thread] = []
    i = 0
    while time.monotonic() - started < seconds:
        t = threading.Thread(target=one, args=(i,), daemon=True)
        t.start()
        threads.append(t)
        counts["created"] += 1
        i += 1
        time.sleep(0.4)
        threads = [t for t in threads if t.is_alive()]
    for t in threads:
        t.join(30)
    time.sleep(2)
    stop.set()
    text = op.metrics()
    orphans = sum(
        len(
            world.kube.list(
                r, None, label_selector="app.kubernetes.io/managed-by=agent-access-operator"
            )
        )
        for r in (SERVICE_ACCOUNTS, ROLES, ROLE_BINDINGS)
    )
    orphans += len(
        [s for s in world.kube.list(SECRETS, agents) if s.get("type") == "agentaccess.io/token"]
    )
    rss = [s["rss_mb"] for s in samples]
    warm = rss[len(rss) // 4 :] or rss
    result = {
        "seconds": seconds,
        "tasks_created": counts["created"],
        "tasks_ended": counts["ended"],
        "modes": counts["modes"],
        "failures": failures[:20],
        "failure_count": len(failures),
        "orphans_at_end": orphans,
        "overdue_max": max(s["overdue"] for s in samples),
        "active_at_end": gauge(text, "agentaccess_active_grants"),
        "rss_mb_first": rss[0],
        "rss_mb_after_warmup_min": min(warm),
        "rss_mb_after_warmup_max": max(warm),
        "rss_mb_last": rss[-1],
        "samples": samples,
    }
    out = ROOT / "bench" / "results" / "soak.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    op.stop()
    summary = {k: v for k, v in result.items() if k != "samples"}
    print(json.dumps(summary, indent=2))
    flat = result["rss_mb_after_warmup_max"] <= result["rss_mb_after_warmup_min"] * 1.2 + 10
    ok = not failures and orphans == 0 and result["overdue_max"] == 0 and flat
    print(
        f"soak: {'PASS' if ok else 'FAIL'} (memory {'flat' if flat else 'GROWING'}); "
        f"operator logs and audit lines in {work}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    # SIGTERM (e.g. from `timeout`) exits normally, so the control plane is torn down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
