#!/usr/bin/env bash
# make e2e-node: the chart installed with the image from `make image-oci` on a real
# node (hack/node.py), the operator running in-cluster as the chart's Deployment.
# Runs the lifecycle e2e against it and the real-Pod tests (e2e/test_node.py), then
# `helm test`. Brings the control plane and the node up if they are not, and takes
# down (verifying nothing is left on the host) only what it brought up.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
HELM="${HELM:-helm}"
VERSION="$($PY -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')"
started=$SECONDS
cp_was_up=1; node_was_up=1
$PY hack/controlplane.py status >/dev/null 2>&1 || cp_was_up=0
$PY hack/node.py status >/dev/null 2>&1 || node_was_up=0
cleanup() {
  rc=$?
  [ "$node_was_up" = 1 ] || $PY hack/node.py down || rc=1
  [ "$cp_was_up" = 1 ] || $PY hack/controlplane.py down
  echo "e2e-node: $( [ $rc = 0 ] && echo passed || echo FAILED ) in $((SECONDS - started)) s" >&2
  exit $rc
}
trap cleanup EXIT
$PY hack/controlplane.py up >/dev/null
$PY hack/node.py up   # imports dist/*.oci.tar (also when already up)
export KUBECONFIG="$PWD/.controlplane/kubeconfig"
# a clean install: nothing left from an earlier run (its release, or its Lease, which a
# replica stopped after its RBAC was gone could not give up)
"$HELM" uninstall agent-access-operator --namespace agent-access-system --ignore-not-found \
  --wait --timeout 120s >/dev/null
.venv/bin/kubectl delete namespace agent-access-system --ignore-not-found --wait --timeout=120s
E2E_KUBECONFIG="$KUBECONFIG" E2E_IN_CLUSTER=1 E2E_NODE=1 E2E_KEEP=1 \
  E2E_IMAGE_REPO=localhost/agent-access-operator E2E_IMAGE_TAG="$VERSION" E2E_PULL_POLICY=Never \
  HELM="$HELM" $PY -m pytest e2e -q -p no:randomly ${PYTEST_ARGS:-}
# the chart's own test Pod: the metrics Service answers /readyz (Service routing and DNS)
"$HELM" test agent-access-operator --namespace agent-access-system --timeout 120s
"$HELM" uninstall agent-access-operator --namespace agent-access-system --wait --timeout 120s
