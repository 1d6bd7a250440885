"""Integration fixtures: a real etcd + kube-apiserver, the CRDs, the operator process.

The control plane is reused when KUBECONFIG points at one that answers; otherwise
one is started for the session (state in a temporary directory) and stopped after.
"""

from __future__ import annotations

import sys

import pytest

from .cluster import FACTS, ROOT, OperatorProcess, World, admin, apply_crds

sys.path.insert(0, str(ROOT / "hack"))
import controlplane


@pytest.fixture(scope="session")
def kubeconfig():
    """Always a control plane of the session's own: tests stop and restart its API
    server and read its controller-manager's state, so never someone else's."""
    with controlplane.temporary("aao-test-cp-") as path:
        yield path


@pytest.fixture(scope="session")
def server_version(kubeconfig):
    version = admin(kubeconfig).request("GET", "/version")
    FACTS["kube-apiserver"] = version["gitVersion"]
    return version["gitVersion"]


@pytest.fixture(scope="session")
def crds(kubeconfig, server_version):
    apply_crds(kubeconfig)


@pytest.fixture(scope="session")
def operator(kubeconfig, crds, tmp_path_factory):
    proc = OperatorProcess(kubeconfig, tmp_path_factory.mktemp("operator"))
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def world(kubeconfig):
    return World(admin(kubeconfig), kubeconfig)


@pytest.fixture
def solo(operator, kubeconfig, tmp_path):
    """Stop the shared operator; hand out operators of our own; restore it after.

    solo(env=..., kubeconfig=..., args=[...]) starts one and returns it.
    """
    operator.stop()
    started: list[OperatorProcess] = []

    def start(env=None, config=None, args=None, wait=30) -> OperatorProcess:
        workdir = tmp_path / f"operator-{len(started)}"
        workdir.mkdir()
        proc = OperatorProcess(config or kubeconfig, workdir, env=env)
        proc.start(args, wait=wait)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()
    operator.start()
