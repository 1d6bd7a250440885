"""e2e fixtures: the chart installed with helm, the operator under the chart's identity.

By default the suite starts its own local control plane (etcd + kube-apiserver)
and runs the operator process locally, authenticated with a token of the
chart's own ServiceAccount and started with the chart's own arguments, so the
permissions exercised are exactly the chart's. With E2E_KUBECONFIG set (e.g. a
kind cluster, see e2e/kind/run.sh) it uses that cluster instead, and with
E2E_IN_CLUSTER=1 the chart's Deployment is the operator.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tests.integration.cluster import (
    ROOT,
    OperatorProcess,
    World,
    admin,
    free_port,
    token_kubeconfig,
    wait_for_admission,
    wait_for_storage,
)

sys.path.insert(0, str(ROOT / "hack"))
import controlplane

RELEASE = "agent-access-operator"
NAMESPACE = "agent-access-system"
CHART = ROOT / "charts" / "agent-access-operator"
HELM = os.environ.get("HELM", "helm")
IN_CLUSTER = os.environ.get("E2E_IN_CLUSTER") == "1"
#: a real node runs Pods (make e2e-node): the chart's Deployment, the agents' Pods
ON_NODE = os.environ.get("E2E_NODE") == "1"

collect_ignore = []
if IN_CLUSTER:  # the RBAC-removal test restarts a local process; in-cluster runs the lifecycle
    collect_ignore.append("test_chart_rbac.py")
if not ON_NODE:  # Pods that really run need a kubelet
    collect_ignore.append("test_node.py")
if os.environ.get("E2E_KUBECONFIG"):  # install tests start API servers of their own
    collect_ignore.append("test_install.py")


@pytest.fixture(scope="session")
def kubeconfig():
    given = os.environ.get("E2E_KUBECONFIG")
    if given:
        yield given
        return
    with controlplane.temporary("aao-e2e-cp-") as path:
        yield path


def helm(kubeconfig: str, *args: str) -> str:
    env = dict(os.environ, KUBECONFIG=kubeconfig)
    return subprocess.run([HELM, *args], check=True, capture_output=True, text=True, env=env).stdout


@pytest.fixture(scope="session")
def release(kubeconfig):
    """helm install, as a platform team would (--wait only where a kubelet runs the pod)."""
    values = [
        "--set",
        f"image.repository={os.environ.get('E2E_IMAGE_REPO', 'agent-access-operator')}",
        "--set",
        f"image.tag={os.environ.get('E2E_IMAGE_TAG', 'e2e')}",
        "--set",
        f"image.pullPolicy={os.environ.get('E2E_PULL_POLICY', 'IfNotPresent')}",
        *(["--wait", "--timeout", "180s"] if ON_NODE else []),
    ]
    helm(
        kubeconfig,
        "upgrade",
        "--install",
        RELEASE,
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--create-namespace",
        *values,
    )
    kubectl = Path(sys.executable).with_name("kubectl")
    subprocess.run(
        [str(kubectl), "wait", "--for", "condition=established", "crd", "--all", "--timeout=60s"],
        check=True,
        env=dict(os.environ, KUBECONFIG=kubeconfig),
        stdout=subprocess.DEVNULL,
    )
    wait_for_storage(admin(kubeconfig))
    wait_for_admission(admin(kubeconfig))
    manifest = list(
        yaml.safe_load_all(helm(kubeconfig, "get", "manifest", RELEASE, "--namespace", NAMESPACE))
    )
    yield [d for d in manifest if d]
    if not os.environ.get("E2E_KEEP"):
        helm(kubeconfig, "uninstall", RELEASE, "--namespace", NAMESPACE)


def chart_args(manifest: list[dict]) -> tuple[str, list[str]]:
    deploy = next(d for d in manifest if d["kind"] == "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert args[0] == "run"
    local = ("--metrics-port", "--metrics-host")  # the test process picks its own
    return pod["serviceAccountName"], [a for a in args[1:] if not a.startswith(local)]


class ChartOperator:
    """The operator as the chart configures it, running locally under its identity."""

    def __init__(self, kubeconfig: str, manifest: list[dict], workdir: Path):
        sa, self.args = chart_args(manifest)
        self.kubeconfig = token_kubeconfig(
            kubeconfig, NAMESPACE, sa, workdir / "operator.kubeconfig"
        )
        self.proc = OperatorProcess(self.kubeconfig, workdir, env={"POD_NAMESPACE": NAMESPACE})
        self.proc.port = free_port()

    def start(self, wait: float = 30) -> None:
        self.proc.start(self.args, wait=wait)

    def stop(self) -> None:
        self.proc.kill()
        admin_lease_reset = getattr(self, "on_stop", None)
        if admin_lease_reset:
            admin_lease_reset()


class InClusterOperator:
    """The chart's Deployment is the operator; tests get a kubeconfig of its identity."""

    def __init__(self, kubeconfig: str, manifest: list[dict], workdir: Path):
        sa, _ = chart_args(manifest)
        self.kubeconfig = token_kubeconfig(kubeconfig, NAMESPACE, sa, workdir / "op.kubeconfig")


@pytest.fixture(scope="session")
def chart_operator(kubeconfig, release, tmp_path_factory):
    if IN_CLUSTER:
        yield InClusterOperator(kubeconfig, release, tmp_path_factory.mktemp("in-cluster"))
        return
    op = ChartOperator(kubeconfig, release, tmp_path_factory.mktemp("chart-operator"))
    op.start()
    yield op
    op.stop()


@pytest.fixture
def world(kubeconfig):
    return World(admin(kubeconfig), kubeconfig)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()
