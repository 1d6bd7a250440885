"""Installing as a platform team would, on a cluster of its own: `kubectl apply -f
manifests/install.yaml` on a fresh API server, then the examples; and every value set
the README and docs mention installed, upgraded and uninstalled with helm, its
workloads admitted under Pod Security `restricted`.

No kubelet runs here, so the Deployment's and the helm test's Pods are judged by the
API server with a server-side dry run of each Pod (Pod Security admission included)
in a namespace that enforces `restricted`.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tests.chart.test_chart import VALUE_SETS as CHART_SETS
from tests.integration.cluster import ROOT, admin, wait_for, wait_for_admission, wait_for_storage

sys.path.insert(0, str(ROOT / "hack"))
import controlplane

from agent_access.kube import NAMESPACES, KubeError

CHART = ROOT / "charts" / "agent-access-operator"
HELM = os.environ.get("HELM", "helm")
KUBECTL = str(Path(sys.executable).with_name("kubectl"))


@pytest.fixture(scope="module")
def fresh():
    with controlplane.temporary("aao-install-") as path:
        yield path


def run(kubeconfig: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        list(args), capture_output=True, text=True, env=dict(os.environ, KUBECONFIG=kubeconfig)
    )
    if check:
        assert result.returncode == 0, f"{' '.join(args)}\n{result.stdout}\n{result.stderr}"
    return result


def kubectl(kubeconfig: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(kubeconfig, KUBECTL, *args, check=check)


def helm(kubeconfig: str, *args: str) -> subprocess.CompletedProcess:
    return run(kubeconfig, HELM, *args)


def restricted_namespace(kubeconfig: str, name: str) -> None:
    kubectl(kubeconfig, "create", "namespace", name)
    kubectl(
        kubeconfig,
        "label",
        "namespace",
        name,
        "pod-security.kubernetes.io/enforce=restricted",
        "pod-security.kubernetes.io/enforce-version=latest",
    )


def pods_admitted(kubeconfig: str, manifest: list[dict], namespace: str) -> None:
    """Every Pod the release would run, created with a server-side dry run."""
    pods = []
    for doc in manifest:
        if doc["kind"] == "Deployment":
            template = doc["spec"]["template"]
            meta = {"name": "dry-" + doc["metadata"]["name"], **template["metadata"]}
            pods.append({"metadata": meta, "spec": template["spec"]})
        elif doc["kind"] == "Pod":
            pods.append({"metadata": {"name": doc["metadata"]["name"]}, "spec": doc["spec"]})
    assert pods
    for pod in pods:
        body = {"apiVersion": "v1", "kind": "Pod", **pod}
        body["metadata"]["namespace"] = namespace
        result = subprocess.run(
            [KUBECTL, "create", "--dry-run=server", "-o", "name", "-f", "-"],
            input=json.dumps(body),
            capture_output=True,
            text=True,
            env=dict(os.environ, KUBECONFIG=kubeconfig),
        )
        assert result.returncode == 0 and "Warning" not in result.stderr, (
            body["metadata"]["name"],
            result.stderr,
        )


def test_pod_security_is_enforced_here(fresh):
    """The control: in a `restricted` namespace a Pod without the hardening is refused,
    so the admissions below mean something."""
    restricted_namespace(fresh, "psa-control")
    bare = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "bare", "namespace": "psa-control"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]},
    }
    result = subprocess.run(
        [KUBECTL, "create", "--dry-run=server", "-f", "-"],
        input=json.dumps(bare),
        capture_output=True,
        text=True,
        env=dict(os.environ, KUBECONFIG=fresh),
    )
    assert result.returncode != 0 and "restricted" in result.stderr, result.stderr


def test_install_yaml_and_the_examples_apply_on_a_fresh_cluster(fresh):
    install = ROOT / "manifests" / "install.yaml"
    result = kubectl(fresh, "apply", "-f", str(install))
    assert "not found" not in result.stderr, result.stderr
    manifest = [d for d in yaml.safe_load_all(install.read_text()) if d]
    for doc in manifest:  # everything, namespaced objects included, is there
        ns = ["-n", doc["metadata"]["namespace"]] if doc["metadata"].get("namespace") else []
        kubectl(fresh, "get", doc["kind"], doc["metadata"]["name"], *ns)
    namespace = next(d for d in manifest if d["kind"] == "Namespace")["metadata"]["name"]
    labels = next(d for d in manifest if d["kind"] == "Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    kubectl(fresh, "wait", "--for", "condition=established", "crd", "--all", "--timeout=60s")
    wait_for_storage(admin(fresh))
    wait_for_admission(admin(fresh))
    # the operator's Pod is admitted in its own (restricted) namespace
    pods_admitted(fresh, manifest, namespace)
    examples = sorted(
        [*(ROOT / "examples").glob("*.yaml"), *(ROOT / "manifests" / "examples").glob("*.yaml")]
    )
    for example in examples:  # each on its own, in any order: it brings what it needs
        kubectl(fresh, "apply", "-f", str(example))
    # Uninstall as an admin would with no operator running: the tasks' finalizer
    # (revoke before deleting) has nothing to wait for, so it is removed by hand.
    for task in kubectl(fresh, "get", "agenttasks", "-A", "-o", "name").stdout.split():
        for ns in ("agents",):
            kubectl(
                fresh,
                "patch",
                "-n",
                ns,
                task,
                "--type=merge",
                "-p",
                '{"metadata":{"finalizers":null}}',
                check=False,
            )
    for example in reversed(examples):
        kubectl(fresh, "delete", "--ignore-not-found", "--timeout=60s", "-f", str(example))
    kubectl(fresh, "delete", "--timeout=60s", "-f", str(install))


VALUE_SETS = {
    "defaults": [],
    "ha": CHART_SETS["ha"],
    "limited": [
        "--set",
        "rbac.grantNamespaces={payments,shop}",
        "--set",
        "rbac.taskNamespaces={agents}",
        "--set",
        "watchNamespaces={agents,payments,shop}",
    ],
    "no-admission-policies": ["--set", "admissionPolicies.enabled=false"],
    "monitoring": [*CHART_SETS["monitoring"], "--set", "networkPolicy.enabled=true"],
    "authz-webhook": CHART_SETS["authz-webhook"],
}


@pytest.mark.parametrize("name", VALUE_SETS)
def test_each_documented_value_set_installs_upgrades_and_uninstalls(fresh, name):
    kube = admin(fresh)
    for ns in ("agents", "payments", "shop"):
        with contextlib.suppress(KubeError):  # there already
            kube.create(NAMESPACES, None, {"metadata": {"name": ns}})
    if name == "monitoring":  # the Prometheus Operator's CRDs, as that stack installs them
        for kind in ("servicemonitors", "prometheusrules"):
            crd = controlplane.find_binary(f"monitoring.coreos.com_{kind}.yaml")
            kubectl(fresh, "apply", "--server-side", "-f", crd)
        kubectl(fresh, "wait", "--for", "condition=established", "crd", "--all", "--timeout=60s")
    namespace = f"aao-{name}"
    release = f"aao-{name}"
    restricted_namespace(fresh, namespace)
    common = [str(CHART), "--namespace", namespace, "--set", f"image.tag=test-{name}"]
    if kubectl(fresh, "get", "crd", "agenttasks.agentaccess.io", check=False).returncode == 0:
        # the CRDs are kept when a release is uninstalled, and belong to one release
        # (values.yaml): a later release leaves them alone
        common += ["--set", "crds.enabled=false"]
    helm(fresh, "install", release, *common, *VALUE_SETS[name])
    manifest = [
        d
        for d in yaml.safe_load_all(
            helm(fresh, "get", "manifest", release, "--namespace", namespace).stdout
        )
        if d
    ]
    hooks = [
        d
        for d in yaml.safe_load_all(
            helm(fresh, "get", "hooks", release, "--namespace", namespace).stdout
        )
        if d
    ]
    pods_admitted(fresh, manifest + hooks, namespace)
    kinds = {d["kind"] for d in manifest}
    if name == "monitoring":
        assert {"ServiceMonitor", "PrometheusRule", "NetworkPolicy"} <= kinds
    if name == "ha":
        assert "PodDisruptionBudget" in kinds
    # an upgrade that changes something, then back
    helm(fresh, "upgrade", release, *common, *VALUE_SETS[name], "--set", "workers=8")
    deploy = json.loads(kubectl(fresh, "get", "deployment", "-n", namespace, "-o", "json").stdout)[
        "items"
    ][0]
    assert "--workers=8" in deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    helm(fresh, "uninstall", release, "--namespace", namespace, "--wait")
    # nothing of the release is left but what is kept on purpose (the CRDs)
    for doc in manifest:
        if doc["kind"] == "CustomResourceDefinition":
            continue
        ns = ["-n", doc["metadata"]["namespace"]] if doc["metadata"].get("namespace") else []
        wait_for(
            lambda d=doc, n=ns: (
                kubectl(fresh, "get", d["kind"], d["metadata"]["name"], *n, check=False).returncode
                != 0
            ),
            30,
            what=f"{doc['kind']} {doc['metadata']['name']} removed",
        )
