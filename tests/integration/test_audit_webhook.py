"""Clusters where the operator cannot be an authorizer still get the use log: the API
server's audit webhook backend (AUDIT_WEBHOOK=1) sends its audit.k8s.io/v1 events to
the operator's /audit endpoint; each call of a per-task identity becomes one `used`
line with the API server's own decision, and counts for idle timeouts."""

from __future__ import annotations

import sys
import time

import pytest

from agent_access.kube import PODS, SECRETS

from .cluster import (
    ROOT,
    OperatorProcess,
    World,
    admin,
    apply_crds,
    as_token,
    status_code,
    wait_for,
)
from .test_authz_webhook import LINE_SCHEMA, PODS_RULE, authz_args, uses

sys.path.insert(0, str(ROOT / "hack"))
import controlplane


@pytest.fixture(scope="module")
def audit_kubeconfig():
    with controlplane.temporary("aao-audit-", {"audit_webhook": True}) as path:
        apply_crds(path)
        yield path


def test_audit_events_become_use_lines_and_keep_a_grant_from_idling(audit_kubeconfig, tmp_path):
    world = World(admin(audit_kubeconfig), audit_kubeconfig)
    proc = OperatorProcess(audit_kubeconfig, tmp_path)
    proc.start(authz_args(audit_kubeconfig))
    try:
        ns = world.namespace("audit")
        world.service_account(ns, "bot")
        world.policy(ns, "p", [(ns, "bot")], [PODS_RULE], idleTimeout="10s")
        world.task(ns, "watched", "bot", [{"namespace": ns, "rules": [PODS_RULE]}])
        task = world.wait_phase(ns, "watched", "Active")
        client = as_token(audit_kubeconfig, world.token(task))
        # no authorizer here: RBAC alone decides, the audit events tell the operator
        assert status_code(lambda: client.list(SECRETS, ns)) == 403
        for _ in range(3):
            assert status_code(lambda: client.list(PODS, ns)) == 200
            time.sleep(4)
        assert world.get_task(ns, "watched")["status"]["phase"] == "Active"
        wait_for(lambda: len(uses(proc, task)) >= 4, 10, what="the calls' audit events")
        lines = uses(proc, task)
        assert len(lines) == 4, lines  # each call once
        assert sorted((u["resource"], u["decision"], u["code"]) for u in lines) == [
            ("pods", "allow", 200)] * 3 + [("secrets", "forbid", 403)]  # fmt: skip
        assert all(u["source"] == "audit" and u["agent"] == "bot" for u in lines)
        for u in lines:
            LINE_SCHEMA.validate(u)
        done = world.wait_phase(ns, "watched", "Expired", timeout=20)
        assert done["status"]["reason"] == "IdleTimeout"
    finally:
        proc.kill()
