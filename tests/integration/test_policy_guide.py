"""Every YAML block of docs/policy-guide.md applies to the real API server, every
policy in it is Ready (its conditions compile), and every AgentTask in it reaches the
phase (and reason) its `# expect:` comment says."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from agent_access.kube import (
    ACCESS_POLICIES,
    AGENT_TASKS,
    CLUSTER_ACCESS_POLICIES,
    NAMESPACES,
    SERVICE_ACCOUNTS,
)

from .cluster import ROOT, wait_for

GUIDE = ROOT / "docs" / "policy-guide.md"
EXPECT = re.compile(
    r"metadata: \{name: ([\w-]+), namespace: ([\w-]+)\}\s+# expect: (\w+)(?: (\w+))?"
)


def blocks() -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", GUIDE.read_text(), re.S)


def test_every_example_of_the_policy_guide_applies_and_behaves(world, operator, tmp_path):
    examples = blocks()
    assert len(examples) >= 8
    for ns in ("agents", "payments", "shop"):
        if world.kube.get(NAMESPACES, None, ns) is None:
            world.kube.create(NAMESPACES, None, {"metadata": {"name": ns}})
        world.kube.merge_patch(
            NAMESPACES, None, ns, {"metadata": {"labels": {"agentaccess.io/guide": "true"}}}
        )
    for sa in ("triage-bot", "release-bot", "scan-bot"):
        if world.kube.get(SERVICE_ACCOUNTS, "agents", sa) is None:
            world.service_account("agents", sa)
    kubectl = Path(sys.executable).with_name("kubectl")
    env = dict(os.environ, KUBECONFIG=world.kubeconfig)
    docs = []
    try:
        for i, text in enumerate(examples):
            path = tmp_path / f"example-{i}.yaml"
            path.write_text(text)
            done = subprocess.run(
                [str(kubectl), "apply", "-f", str(path)], capture_output=True, text=True, env=env
            )
            assert done.returncode == 0, f"example {i}:\n{text}\n{done.stderr}"
            docs += [d for d in yaml.safe_load_all(text) if d]
        for d in docs:
            meta = d["metadata"]
            if d["kind"] in ("AccessPolicy", "ClusterAccessPolicy"):
                res = ACCESS_POLICIES if d["kind"] == "AccessPolicy" else CLUSTER_ACCESS_POLICIES
                ns = meta.get("namespace")

                def ready(res=res, ns=ns, name=meta["name"]):
                    status = (world.kube.get(res, ns, name) or {}).get("status") or {}
                    return [c for c in status.get("conditions") or () if c["type"] == "Ready"]

                (cond,) = wait_for(ready, 10, what=f"{meta['name']} Ready")
                assert cond["status"] == "True", (meta["name"], cond)
        expectations = [m.groups() for text in examples for m in EXPECT.finditer(text)]
        assert len(expectations) >= 4
        for name, ns, phase, reason in expectations:
            got = world.wait_phase(ns, name, phase)["status"]
            if reason:
                assert got["reason"] == reason, (name, got)
    finally:
        for d in reversed(docs):
            meta = d["metadata"]
            res = {
                "AccessPolicy": ACCESS_POLICIES,
                "ClusterAccessPolicy": CLUSTER_ACCESS_POLICIES,
                "AgentTask": AGENT_TASKS,
            }[d["kind"]]
            world.kube.delete(res, meta.get("namespace"), meta["name"])
