"""Where a single grant's time goes: one task at a time, the operator's requests as
the API server's audit log records them, on the benchmark client's clock.

    .venv/bin/python bench/timeline.py [N]     # N grants (default 20), medians printed

A control plane of its own with an audit log (AUDIT_LOG); the operator runs under
its installed identity (ServiceAccount tokens are audited, admin certificates are
not). Used for docs/benchmarks.md ("A single grant's timeline").
"""

from __future__ import annotations

import base64
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "hack")]

import controlplane  # noqa: E402
from tests.integration.cluster import OperatorProcess, World, admin, apply_crds  # noqa: E402

from agent_access.authz import epoch  # noqa: E402
from agent_access.kube import AGENT_TASKS, SECRETS  # noqa: E402
from agent_access.objects import base_name  # noqa: E402
from bench.bench import OPERATOR_NAMESPACE, OPERATOR_SA, READ, operator_identity  # noqa: E402

OPERATOR = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_SA}"


def main(n: int) -> None:
    with controlplane.temporary("aao-timeline-", {"audit_log": True}) as kubeconfig:
        apply_crds(kubeconfig)
        workdir = Path(tempfile.mkdtemp(prefix="aao-timeline-op-"))
        op = OperatorProcess(
            operator_identity(kubeconfig, workdir),
            workdir,
            env={"POD_NAMESPACE": OPERATOR_NAMESPACE},
        )
        op.start()
        world = World(admin(kubeconfig), kubeconfig)
        kube = world.kube
        agents, target = world.namespace("tl-agents"), world.namespace("tl-target")
        world.service_account(agents, "bot")
        world.policy(target, "read", [(agents, "bot")], READ)
        samples = []
        for i in range(n):
            name = f"tl-{i}"
            stream = kube.watch(AGENT_TASKS, "", 30, agents, field_selector=f"metadata.name={name}")
            next(stream)  # OPEN
            t0 = time.time()
            world.task(agents, name, "bot", [{"namespace": target, "rules": READ}])
            created = time.time()
            task = next(o for _, o in stream if (o.get("status") or {}).get("phase") == "Active")
            active = time.time()
            stream.close()
            secret = task["status"]["tokenSecretName"]
            base64.b64decode(kube.get(SECRETS, agents, secret)["data"]["token"])
            has_token = time.time()
            kube.get(SECRETS, agents, secret)
            again = time.time()
            samples.append((task, t0, created, active, has_token, again))
            time.sleep(0.3)
        op.stop()
        time.sleep(1)
        log = Path(kubeconfig).parent / "audit.log"
        entries = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    rows: dict[str, list[tuple[float, float]]] = {}
    for task, t0, created, active, has_token, again in samples[3:]:  # the first warm up
        name, uid = task["metadata"]["name"], task["metadata"]["uid"]
        base = base_name(name, uid)
        for e in entries:
            ref = e.get("objectRef") or {}
            obj = ref.get("name") or ""
            event = (
                ref.get("resource") == "events" and abs(epoch(e["stageTimestamp"]) - active) < 0.2
            )
            if e.get("user", {}).get("username") != OPERATOR or not (
                obj.startswith(base) or obj == name or event
            ):
                continue
            sub = f"/{ref['subresource']}" if ref.get("subresource") else ""
            what = "<task>" if obj == name else obj.replace(base, "<identity>")
            key = f"operator: {e['verb']} {ref.get('resource')}{sub} {what}"
            start, end = epoch(e["requestReceivedTimestamp"]) - t0, epoch(e["stageTimestamp"]) - t0
            rows.setdefault(key, []).append((start, end))
        rows.setdefault("client: create the AgentTask", []).append((0, created - t0))
        rows.setdefault("client: watch sees Active", []).append((0, active - t0))
        rows.setdefault("client: first GET of the Secret", []).append((active - t0, has_token - t0))
        rows.setdefault("client: the same GET again", []).append((has_token - t0, again - t0))
    print(f"{'what (medians, ms from the create)':60s} {'start':>7s} {'end':>7s}")
    for key, spans in sorted(rows.items(), key=lambda kv: statistics.median(e for _, e in kv[1])):
        start = statistics.median(s for s, _ in spans) * 1000
        end = statistics.median(e for _, e in spans) * 1000
        print(f"{key:60s} {start:7.1f} {end:7.1f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
