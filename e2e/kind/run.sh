#!/usr/bin/env bash
# e2e on a kind cluster (machines with Docker): build the image, load it into kind,
# helm install the chart, and run the same lifecycle suite against the operator
# running in-cluster as the chart's Deployment.
#   e2e/kind/run.sh            create the cluster, test, delete the cluster
#   KEEP=1 e2e/kind/run.sh     keep the cluster afterwards
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v docker >/dev/null && docker info >/dev/null 2>&1 || { echo "needs a running Docker engine"; exit 1; }
command -v kind >/dev/null || { echo "needs kind (go install sigs.k8s.io/kind@latest)"; exit 1; }
CLUSTER=agent-access-e2e
TAG="e2e-$(git rev-parse --short HEAD 2>/dev/null || echo dev)"
REPO=agent-access-operator
make install binaries
kind create cluster --config e2e/kind/kind-config.yaml --wait 120s
trap '[ -n "${KEEP:-}" ] || kind delete cluster --name "$CLUSTER"' EXIT
docker build -t "$REPO:$TAG" .
kind load docker-image "$REPO:$TAG" --name "$CLUSTER"
KCFG="$(mktemp)"; kind get kubeconfig --name "$CLUSTER" > "$KCFG"
HELM="$(hack/build-binaries.sh --print | tr ':' '\n' | grep helm)/helm"
KUBECONFIG="$KCFG" "$HELM" upgrade --install agent-access-operator charts/agent-access-operator \
  --namespace agent-access-system --create-namespace \
  --set image.repository="$REPO" --set image.tag="$TAG" --set image.pullPolicy=Never --wait
E2E_KUBECONFIG="$KCFG" E2E_IN_CLUSTER=1 E2E_IMAGE_REPO="$REPO" E2E_IMAGE_TAG="$TAG" \
  E2E_KEEP=1 HELM="$HELM" .venv/bin/python -m pytest e2e -q -p no:randomly
KUBECONFIG="$KCFG" "$HELM" test agent-access-operator --namespace agent-access-system
