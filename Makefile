# mantlet — run 'make' or 'make help' for the targets.

GO      ?= go
BIN     ?= bin/mantlet
# Root-only tests fail instead of skipping when CI=true (see internal/privtest).
TESTFLAGS ?= -count=1 -timeout 60m

.DEFAULT_GOAL := help

.PHONY: help build test test-unit lint generate check-generate bench bench-smoke peer-binaries prometheus-binaries demo clean image manifests

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-15s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# Build tags of bin/mantlet and the image: TAGS=spire links the SPIRE issuer
# (--issuer spire) and its gRPC client, about 12 MiB more resident memory in
# every agent.
TAGS ?=

# Static (no cgo), as the image is built: no C library to map, about 0.8
# MiB less resident memory in every agent.
build: ## build bin/mantlet (TAGS=spire: with the SPIRE issuer)
	CGO_ENABLED=0 $(GO) build -tags "$(TAGS)" -o $(BIN) ./cmd/mantlet

test: ## run every test of every module (root, test/interop, deploy/tools), then list passed and failed packages (what CI runs; as root with the namespaced eBPF/testbed tests)
	GO="$(GO)" .ci/gotest $(TESTFLAGS)

test-unit: ## run the tests that need no root, quickly
	$(GO) test -count=1 -short ./...

# The modules whose go.mod and go.sum must be tidy (a direct import
# marked // indirect, a missing or unused requirement fails lint).
MODULES := . test/interop test/kube/tools test/bench/tools test/spire/tools test/prometheus/tools deploy/tools

lint: ## gofmt, go vet, staticcheck, and go mod tidy -diff of every module
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt wants to change:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) vet -tags spire ./cmd/mantlet
	$(GO) tool staticcheck ./...
	cd test/interop && $(GO) vet ./... && $(GO) tool staticcheck ./...
	cd deploy/tools && $(GO) vet ./... && $(GO) tool staticcheck ./...
	@for m in $(MODULES); do (cd $$m && $(GO) mod tidy -diff) || { echo "$$m/go.mod is not tidy: run 'go mod tidy' in $$m and commit"; exit 1; }; done

# The Kubernetes API server for the tests (internal/kubetest, docs/kubetest.md).
.PHONY: kube-binaries test-kube
kube-binaries: ## build kube-apiserver, etcd, kubelet, kube-proxy, kube-controller-manager, kube-scheduler and kubectl for the tests (once 10-20 min on 2 cores, then cached)
	$(GO) run ./internal/binbuild/cmd/build-binaries kube

test-kube: kube-binaries ## build the Kubernetes programs if needed, then run the harnesses' tests (API server; real two-node cluster, as root)
	$(GO) test $(TESTFLAGS) ./internal/kubetest/... ./internal/kubecluster/...

.PHONY: demo-kubernetes
demo-kubernetes: kube-binaries ## bring up a real two-node Kubernetes cluster on this machine (needs root), install mantlet with helm and run the demo's checks; Ctrl-C removes it
	$(GO) run ./internal/kubecluster/cmd/kubecluster up

# The SPIRE server and agent for the tests (internal/spiretest, docs/spiretest.md).
.PHONY: spire-binaries
spire-binaries: ## build spire-server and spire-agent for the SPIRE tests (needs gcc; once several minutes on 2 cores, then cached)
	$(GO) run ./internal/binbuild/cmd/build-binaries spire

# What controller-gen writes from the MeshPolicy types (policy/v1alpha1/gen.go).
API_GENERATED := policy/v1alpha1/zz_generated.deepcopy.go deploy/charts/mantlet/crds/

generate: ## rebuild the eBPF objects with bpf2go (needs clang-19, llvm-19, libbpf-dev), and the MeshPolicy deep copies and CRD with controller-gen
	$(GO) generate ./bpf/... ./policy/v1alpha1/...

check-generate: generate ## fail if the committed eBPF objects, MeshPolicy deep copies or CRD differ from a fresh build
	@git diff --exit-code --stat -- bpf/ || { echo "bpf2go output is stale: run 'make generate' and commit"; exit 1; }
	@git diff --exit-code --stat -- $(API_GENERATED) && test -z "$$(git status --porcelain -- $(API_GENERATED))" || { git status --short -- $(API_GENERATED); echo "controller-gen output is stale or not committed: run 'make generate' and commit"; exit 1; }

# Where 'make bench' writes: the Go benchmarks' output (benchstat format)
# and the testbed bench's bench.json, table.txt and bench.png.
BENCH_STAMP := $(shell date -u +%Y%m%d-%H%M%S)
BENCH_OUT ?= bench-results/$(BENCH_STAMP)

bench: build ## run the Go benchmarks, then (as root) the peer bench on the testbed: direct, mantlet, ghostunnel and nginx pairs, interleaved (docs/performance.md); results in bench-results/<time>
	@mkdir -p $(BENCH_OUT)
	{ $(GO) test -run '^$$' -bench . -benchmem -count=1 -timeout 30m ./...; echo $$? >$(BENCH_OUT)/go-bench.rc; } | tee $(BENCH_OUT)/go-bench.txt; \
		rc=$$(cat $(BENCH_OUT)/go-bench.rc); rm -f $(BENCH_OUT)/go-bench.rc; exit $$rc
	@if [ "$$(id -u)" = 0 ]; then ./$(BIN) bench --out $(BENCH_OUT); else echo "bench: the testbed bench (mantlet bench) was skipped: it needs root (network namespaces, eBPF); run 'sudo make bench'"; fi

# BenchmarkScale and BenchmarkAgentScale fill a real API server
# (minutes); the API server tests and TestAgentScaleSmoke (the agent
# bench's code on a small cluster, in make test) cover them.
bench-smoke: ## run every Go benchmark once (-benchtime=1x), so that none rots (what CI runs)
	$(GO) test -run '^$$' -bench . -benchtime=1x -skip '^Benchmark(Agent)?Scale$$' -count=1 -timeout 20m ./...

peer-binaries: ## build ghostunnel for the peer bench from test/bench/tools (2-3 min once, then cached)
	$(GO) run ./internal/binbuild/cmd/build-binaries peer

prometheus-binaries: ## build the Prometheus server of the real-cluster tests (Kubernetes discovery, which Debian's lacks) from test/prometheus/tools (minutes once, then cached)
	$(GO) run ./internal/binbuild/cmd/build-binaries prometheus

demo: build ## run the two-node demo (needs root)
	./$(BIN) demo

# The image's platforms; the first is also the one 'crane push FILE' pushes.
IMAGE_PLATFORMS ?= linux/amd64,linux/arm64

image: ## write bin/mantlet-image.tar, the agent's OCI image (static binary, no base; no Docker needed), named as the chart expects (TAGS=spire: with the SPIRE issuer)
	cd deploy/tools && GO="$(GO)" GOFLAGS="-tags=$(TAGS)" $(GO) run ./image -root ../.. -out ../../bin/mantlet-image.tar -platforms $(IMAGE_PLATFORMS)

manifests: ## copy the dashboard into the chart and render deploy/mantlet.yaml from the Helm chart (default values)
	cp deploy/grafana-dashboard.json deploy/charts/mantlet/files/grafana-dashboard.json
	cd deploy/tools && $(GO) run ./manifests -root ../..

clean: ## remove build output
	rm -rf bin
