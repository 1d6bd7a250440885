#!/usr/bin/env bash
# make demo: the operator on the local control plane with the example scenario.
# Shows a task going Active, the agent's token doing exactly what was granted and
# nothing else, then cancel -> Cancelled and the same token refused.
set -euo pipefail
cd "$(dirname "$0")/.."
K=".venv/bin/kubectl"
: "${KUBECONFIG:?KUBECONFIG must point at the control plane (make demo sets it)}"
PORT="${DEMO_METRICS_PORT:-18080}"
LOG="$(mktemp -d)/operator.log"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "Installing the CRDs"
$K apply -f crds/ >/dev/null
$K wait --for condition=established crd --all --timeout=30s >/dev/null
# the API server's admission policies learn the new AgentTask type within seconds
for _ in $(seq 120); do
  $K apply --dry-run=server -f examples/30-agenttask.yaml >/dev/null 2>&1 && break; sleep 0.5
done
$K delete agenttask -n agents incident-4711-summary --ignore-not-found --wait=false >/dev/null 2>&1 || true

say "Starting the operator (logs: $LOG)"
.venv/bin/agent-access-operator run --metrics-port "$PORT" --metrics-host 127.0.0.1 >"$LOG" 2>&1 &
OP=$!
trap 'kill $OP 2>/dev/null; wait $OP 2>/dev/null || true' EXIT
for _ in $(seq 100); do .venv/bin/python -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=1)" "http://127.0.0.1:$PORT/readyz" 2>/dev/null && break; sleep 0.1; done
# a previous demo run may have left the task behind
$K delete agenttask -n agents incident-4711-summary --ignore-not-found >/dev/null 2>&1 || true

say "The scenario: namespaces, the agent's ServiceAccount, the payments team's AccessPolicy, the agent's pod"
$K apply -f examples/00-namespaces.yaml -f examples/10-policy.yaml -f examples/20-pod.yaml
$K patch pod -n agents triage-bot-7f9c --subresource status --type merge -p '{"status":{"phase":"Running"}}' >/dev/null

say "The agent asks: read pod logs in payments for incident 4711, for 10 minutes"
sed -n '/^apiVersion/,$p' examples/30-agenttask.yaml
$K apply -f examples/30-agenttask.yaml
$K wait --for jsonpath='{.status.phase}'=Active agenttask -n agents incident-4711-summary --timeout=20s >/dev/null
$K get agenttasks -n agents

say "Who asked (stamped by the API server at admission; clients cannot set it)"
$K get agenttask -n agents incident-4711-summary -o jsonpath='{.status.requester.username}{"\n"}'

say "What was granted (status)"
$K get agenttask -n agents incident-4711-summary -o jsonpath='{.status.message}{"\n"}identity: {.status.serviceAccountName}{"\n"}token in Secret: {.status.tokenSecretName} (key token){"\n"}'

SECRET=$($K get agenttask -n agents incident-4711-summary -o jsonpath='{.status.tokenSecretName}')
TOKEN=$($K get secret -n agents "$SECRET" -o jsonpath='{.data.token}' | base64 -d)
SERVER=$($K config view --raw --minify -o jsonpath='{.clusters[0].cluster.server}')
CA=$(mktemp); $K config view --raw --minify -o jsonpath='{.clusters[0].cluster.certificate-authority-data}' | base64 -d >"$CA"
as_agent() { $K --kubeconfig=/dev/null --server="$SERVER" --certificate-authority="$CA" --token="$TOKEN" "$@" 2>&1 | tail -1; }

say "With the task's token, as the agent"
echo "\$ kubectl auth can-i list pods -n payments    -> $(as_agent auth can-i list pods -n payments || true)"
echo "\$ kubectl auth can-i get pods/log -n payments -> $(as_agent auth can-i get pods --subresource=log -n payments || true)"
echo "\$ kubectl auth can-i delete pods -n payments  -> $(as_agent auth can-i delete pods -n payments || true)"
echo "\$ kubectl auth can-i get secrets -n payments  -> $(as_agent auth can-i get secrets -n payments || true)"
echo "\$ kubectl get pods -n payments               -> $(as_agent get pods -n payments || true)"

say "As the agent's own ServiceAccount: it may read exactly its token Secret, nothing else"
AGENT=system:serviceaccount:agents:triage-bot
echo "\$ kubectl auth can-i get secret/$SECRET -n agents --as \$AGENT -> $($K auth can-i get "secret/$SECRET" -n agents --as "$AGENT" || true)"
echo "\$ kubectl auth can-i list secrets -n agents --as \$AGENT -> $($K auth can-i list secrets -n agents --as "$AGENT" || true)"

say "The task is done: cancel it"
$K patch agenttask -n agents incident-4711-summary --type merge -p '{"spec":{"cancel":true}}'
$K wait --for jsonpath='{.status.phase}'=Cancelled agenttask -n agents incident-4711-summary --timeout=10s >/dev/null
$K get agenttasks -n agents
echo "\$ kubectl get pods -n payments (same token)  -> $(as_agent get pods -n payments || true)"
echo "objects left for the task: $($K get sa,secret -n agents -l agentaccess.io/task-name=incident-4711-summary -o name | wc -l) in agents, $($K get role,rolebinding -n payments -l agentaccess.io/task-name=incident-4711-summary -o name | wc -l) in payments"

say "Events on the task (kubectl describe)"
$K describe agenttask -n agents incident-4711-summary | sed -n '/^Events:/,$p'

say "Audit lines (JSON, one per decision)"
grep '^{' "$LOG" | cut -c1-220
echo
echo "Done. The control plane is still up: export KUBECONFIG=$KUBECONFIG ; 'make controlplane-down' stops it."
