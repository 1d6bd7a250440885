# agent-access-operator — run `make help` for the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV        ?= .venv
PY          := $(VENV)/bin/python
KUBECTL     := $(VENV)/bin/kubectl
KUBECONFIG_LOCAL := $(CURDIR)/.controlplane/kubeconfig
PYTEST_ARGS ?=
HELM         = $(shell hack/build-binaries.sh --print | tr ':' '\n' | grep helm)/helm
CHART       := charts/agent-access-operator
IMAGE       ?= ghcr.io/agent-access/agent-access-operator:0.1.0
K8S_VERSION ?= 1.37.2
export K8S_VERSION
# the oldest supported release (docs/versions.md): make test-matrix runs it too
MATRIX_OLDEST ?= 1.36.3
# controlplane-up options: the operator as the API server's authorization webhook,
# the API server's audit log (file) and its audit webhook backend
AUTHZ_WEBHOOK ?=
AUDIT_LOG     ?=
AUDIT_WEBHOOK ?=
AUTHZ_DIR   := $(CURDIR)/.controlplane/authz

.PHONY: help install binaries controlplane-up controlplane-down crds manifests lint test test-matrix \
        test-unit test-chart test-integration e2e bench bench-quick profile soak demo run image clean \
        node-up node-down node-prerequisites image-oci e2e-node

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  %-20s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed ## Create .venv/ and install the operator with its dev extra

binaries: ## Build kube-apiserver, kube-controller-manager, etcd and helm from the Go module proxy (cached by version)
	hack/build-binaries.sh

controlplane-up: install binaries ## Start the local etcd + kube-apiserver; kubeconfig in .controlplane/ (AUTHZ_WEBHOOK=1 AUDIT_LOG=1 AUDIT_WEBHOOK=1)
	AUTHZ_WEBHOOK=$(AUTHZ_WEBHOOK) AUDIT_LOG=$(AUDIT_LOG) AUDIT_WEBHOOK=$(AUDIT_WEBHOOK) \
	  $(PY) hack/controlplane.py up

controlplane-down: ## Stop the local control plane (and its node, if up) and remove its state
	@if [ -x $(PY) ]; then [ ! -d .node ] || $(PY) hack/node.py down; \
	  $(PY) hack/controlplane.py down; else rm -rf .controlplane .node; fi

node-up: controlplane-up ## A real node joined to the local control plane: kubelet + containerd, kube-scheduler; imports dist/*.oci.tar
	$(PY) hack/node.py up

node-prerequisites: install ## Install the Debian packages node-up and image-oci need (containerd, runc, CNI plugins, ...)
	$(PY) hack/node.py prerequisites

node-down: ## Stop the node and remove every trace of it from the host (fails if anything is left)
	@if [ -x $(PY) ]; then $(PY) hack/node.py down; else rm -rf .node; fi

VERSION     := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE_OCI   := dist/agent-access-operator-$(VERSION).oci.tar

image-oci: install ## The operator image as an OCI archive in dist/, from Debian packages, without Docker
	hack/image-oci.sh

# rebuilt only when what goes into it changed (a warm `make e2e-node` skips it)
$(IMAGE_OCI): $(VENV)/.installed pyproject.toml README.md hack/image-oci.sh hack/oci.py $(shell git ls-files operator)
	hack/image-oci.sh

crds: install ## Regenerate crds/ (and the chart's copy) from hack/gen_crds.py
	$(PY) hack/gen_crds.py

manifests: install binaries ## Render manifests/install.yaml from the chart (default values), with its Namespace
	{ cat hack/install-namespace.yaml; $(HELM) template agent-access-operator $(CHART) \
	  --namespace agent-access-system --kube-version $(K8S_VERSION) --skip-tests \
	  --include-crds; } > manifests/install.yaml

lint: install ## ruff (lint and format check) and mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy operator/agent_access

test-unit: install ## Unit tests (pure logic, no cluster)
	$(PY) -m pytest tests/unit -q $(PYTEST_ARGS)

test-integration: install binaries ## Integration tests against the real local control plane
	$(PY) -m pytest tests/integration -q -p no:randomly $(PYTEST_ARGS)

test-chart: install binaries ## helm lint, rendered manifests validated, install.yaml current
	$(HELM) lint --strict $(CHART)
	HELM=$(HELM) $(PY) -m pytest tests/chart -q $(PYTEST_ARGS)

test: lint test-unit test-chart test-integration ## ruff, unit, chart, then integration tests (the CI command)

test-matrix: install ## The integration suite and the chart e2e on the oldest supported release too (MATRIX_OLDEST)
	K8S_VERSION=$(MATRIX_OLDEST) K8S_COMPONENTS="kube-apiserver kube-controller-manager" \
	  $(MAKE) binaries test-integration e2e

e2e: install binaries ## Chart e2e on the local control plane, under the chart's own identity
	HELM=$(HELM) $(PY) -m pytest e2e -q -p no:randomly $(PYTEST_ARGS)

e2e-node: install binaries $(IMAGE_OCI) ## The chart's Deployment on a real node: lifecycle e2e, real Pods, helm test
	HELM=$(HELM) hack/e2e-node.sh

demo: controlplane-up ## Run the operator on the local control plane with the example; watch a grant live and end
	KUBECONFIG=$(KUBECONFIG_LOCAL) hack/demo.sh

run: controlplane-up ## Run the operator in the foreground against the local control plane
	KUBECONFIG=$(KUBECONFIG_LOCAL) $(KUBECTL) apply -f crds/
	KUBECONFIG=$(KUBECONFIG_LOCAL) $(VENV)/bin/agent-access-operator run \
	  $$([ -f $(AUTHZ_DIR)/port ] && echo --authz-port $$(cat $(AUTHZ_DIR)/port) \
	     --authz-cert $(AUTHZ_DIR)/tls.crt --authz-key $(AUTHZ_DIR)/tls.key \
	     --authz-client-ca $(AUTHZ_DIR)/client-ca.crt --authz-host 127.0.0.1)

bench: install binaries ## Benchmarks (full): latency vs the raw-API floor, pod churn, 10,000 live grants, 10,000 namespaces
	$(PY) bench/bench.py

bench-quick: install binaries ## Benchmarks, quick mode (about a minute: latencies, 200 grants at once)
	$(PY) bench/bench.py --quick

profile: install binaries ## Profile the operator (py-spy) and kube-apiserver (pprof) through the scale run: bench/results/profile*.txt
	BENCH_PROFILE=bench/results/profile $(PY) bench/bench.py --only scale --tasks $${PROFILE_TASKS:-10000}

soak: install binaries ## Soak: tasks created, used and ended for SOAK_SECONDS (default 600)
	$(PY) bench/soak.py

image: ## Build the operator image (needs a Docker engine; none runs on the dev machines)
	docker build -t $(IMAGE) .

clean: controlplane-down ## Remove the venv and caches (the binary cache in ~/.cache stays)
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .hypothesis
