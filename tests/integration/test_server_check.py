"""The start-up check against a real API server that does not serve
MutatingAdmissionPolicy (switched off with --runtime-config, as a cluster below 1.36
or with the feature off would be): the operator refuses to start and says why; with
--skip-server-check it starts and its metric says the server is not supported."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .cluster import ROOT, OperatorProcess, wait_for

sys.path.insert(0, str(ROOT / "hack"))
import controlplane

OFF = "admissionregistration.k8s.io/v1/mutatingadmissionpolicies=false"


@pytest.fixture(scope="module")
def without_map():
    options = {"runtime_config": OFF, "disable_plugins": "ServiceAccount,MutatingAdmissionPolicy"}
    with controlplane.temporary("aao-nomap-", options) as path:
        yield path


def test_the_operator_refuses_a_server_without_mutating_admission_policies(without_map, tmp_path):
    proc = OperatorProcess(without_map, tmp_path)
    proc.start(wait=0)
    assert proc.proc is not None
    try:
        code = proc.proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the operator kept running on an unsafe server") from None
    assert code != 0
    logs = proc.logs()
    assert "refusing to start on this API server" in logs, logs[-2000:]
    assert "mutatingadmissionpolicies is not served" in logs
    assert "mutating-admission-policies: NO" in logs

    skipping = OperatorProcess(without_map, tmp_path / "skip")
    (tmp_path / "skip").mkdir()
    skipping.start(["--skip-server-check"], wait=0)
    try:
        wait_for(lambda: "agentaccess_server_supported" in _metrics(skipping), 30, 0.2,
                 "the operator started anyway")  # fmt: skip
        text = _metrics(skipping)
        assert 'agentaccess_server_feature{feature="mutating-admission-policies"} 0.0' in text
        assert "agentaccess_server_supported{" in text and '"} 0.0' in text
    finally:
        skipping.kill()


def _metrics(proc: OperatorProcess) -> str:
    try:
        return proc.metrics()
    except OSError:
        return ""
