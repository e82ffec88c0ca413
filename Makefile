# nomad-driver-nixos
SHELL := /bin/bash
GO ?= go
BUILD := build
PLUGIN := $(BUILD)/nomad-driver-nixos
TESTHOST := e2e/testhost/testhost.sh
VMHOST := e2e/vmhost/vmhost.sh
STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.8.2
FIXTURES_ENV := $(or $(NIXOS_NSPAWN_CACHE),/var/cache/nomad-driver-nixos)/fixtures.env
# Packages that hold test binaries run inside the systemd test host.
INTEGRATION_PKGS := closure driver
# rclone's `serve s3`, the S3 server of the closure tests, built once (e2e/tools/rclone.sh) and
# copied where the test host sees it.
RCLONE := $(BUILD)/rclone

.PHONY: all build helper rclone lint unit testhost-ready integration vm-ready vm vm-bench-bridge nix-parse e2e e2e-cluster bench test demo demo-stop testhost-down clean

all: build

# The console helper, which the plugin (and the integration test binaries) embed.
CONSOLE_HELPER := driver/consolehelper/nomad-driver-nixos-console

# Static binaries: NixOS hosts have no /lib64/ld-linux-x86-64.so.2.
helper:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '-s -w' -o $(CONSOLE_HELPER) ./cmd/nomad-driver-nixos-console

build: helper
	CGO_ENABLED=0 $(GO) build -trimpath -o $(PLUGIN) ./cmd/nomad-driver-nixos

lint:
	@unformatted=$$(gofmt -l $$(git ls-files '*.go')); \
	if [ -n "$$unformatted" ]; then echo "not gofmt-formatted:"; echo "$$unformatted"; exit 1; fi
	$(GO) vet ./...
	$(GO) vet -tags integration ./...
	$(GO) vet -tags e2e ./...
	$(GO) vet -tags e2e,e2e_cluster ./...
	$(GO) run $(STATICCHECK) -tags integration,e2e,e2e_cluster ./...

# Pure logic; runs anywhere.
unit:
	$(GO) test -count=1 ./...

# Everything that needs systemd, machined and nspawn runs inside a booted systemd test host.
testhost-ready: build rclone
	$(TESTHOST) up
	e2e/fixtures/build.sh
	@for p in $(INTEGRATION_PKGS); do \
		CGO_ENABLED=0 $(GO) test -c -tags integration -o $(BUILD)/$$p.integration.test ./$$p || exit 1; \
	done

rclone:
	@mkdir -p $(BUILD); src=$$(e2e/tools/rclone.sh) && cmp -s "$$src" $(RCLONE) || install -m 0755 "$$src" $(RCLONE)

integration: testhost-ready
	@set -a; . $(FIXTURES_ENV); set +a; export NIXOS_NSPAWN_RCLONE=$(CURDIR)/$(RCLONE); \
	for p in $(INTEGRATION_PKGS); do \
		echo "== integration tests of $$p (in the systemd test host)"; \
		(cd $$p && $(CURDIR)/$(TESTHOST) exec $(CURDIR)/$(BUILD)/$$p.integration.test -test.v -test.count=1 -test.timeout=30m) || exit 1; \
	done

# What only a real kernel on the unified cgroup v2 hierarchy shows, with Debian 13's systemd 257,
# in a QEMU VM (e2e/vmhost). QEMU emulates the CPU there (TCG), 20-30 times slower than native,
# so the VM runs only these tests, not the whole integration suite.
VM_TESTS := TestCgroupV2.*|TestManagerWatches|TestOutboundMasquerade|TestExitCodes|TestStop|TestStopContract|TestOOMKilled|TestFingerprint|TestCyclesLeaveNothing|TestDevices|TestHostVolume
# Nomad's bridge mode under a real agent with the CNI plugins (TestBridge): it makes a bridge and
# iptables rules in the host's network namespace, so it runs only in the VM host, after the suite
# above.
VM_BRIDGE_TESTS := TestBridge
VM_ENV = NIXOS_NSPAWN_REQUIRE_CGROUP_V2=1 NIXOS_NSPAWN_TEST_TIME_SCALE=5 \
	NIXOS_NSPAWN_NOMAD=$$($(CURDIR)/e2e/nomad/build.sh) NIXOS_NSPAWN_PLUGIN=$(CURDIR)/$(PLUGIN)
vm-ready: build
	e2e/fixtures/build.sh
	e2e/nomad/build.sh >/dev/null
	CGO_ENABLED=0 $(GO) test -c -tags integration -o $(BUILD)/driver.integration.test ./driver
	$(VMHOST) up

vm: vm-ready
	@set -a; . $(FIXTURES_ENV); set +a; \
	echo "== integration tests of driver (in the cgroup v2 VM host): $(VM_TESTS)"; \
	start=$$(date +%s); \
	(cd driver && $(VM_ENV) $(CURDIR)/$(VMHOST) exec $(CURDIR)/$(BUILD)/driver.integration.test \
		-test.v -test.count=1 -test.timeout=40m -test.run '^($(VM_TESTS))$$'); rc=$$?; \
	echo "== VM suite: $$(( $$(date +%s) - start ))s, exit $$rc"; \
	echo "== bridge mode under a real agent (in the VM host): $(VM_BRIDGE_TESTS)"; \
	start=$$(date +%s); \
	(cd driver && $(VM_ENV) $(CURDIR)/$(VMHOST) exec $(CURDIR)/$(BUILD)/driver.integration.test \
		-test.v -test.count=1 -test.timeout=40m -test.run '^($(VM_BRIDGE_TESTS))$$'); brc=$$?; \
	echo "== VM bridge suite: $$(( $$(date +%s) - start ))s, exit $$brc"; \
	$(VMHOST) down; [ $$rc -eq 0 ] && [ $$brc -eq 0 ]

# From `nomad job run` to a service answering, bridge mode vs the driver's veth (see the README's
# Performance), in the VM host.
vm-bench-bridge: vm-ready
	@set -a; . $(FIXTURES_ENV); set +a; \
	(cd driver && $(VM_ENV) $(CURDIR)/$(VMHOST) exec $(CURDIR)/$(BUILD)/driver.integration.test \
		-test.run '^$$' -test.bench JobRunToAnswer -test.benchtime $(or $(BENCHTIME),3x)); rc=$$?; \
	$(VMHOST) down; exit $$rc

# A real Nomad v1.11.3 agent (built from source, cached) runs the driver inside the test host; the
# tests talk to it only through the nomad CLI and the HTTP API.
e2e: testhost-ready
	e2e/nomad/build.sh
	e2e/agent/agent.sh up
	@set -a; . $(FIXTURES_ENV); set +a; export NIXOS_NSPAWN_RCLONE=$(CURDIR)/$(RCLONE); \
	$(GO) test -count=1 -tags e2e -v -timeout 30m ./e2e/

# nixpkgs is out of reach here, so every .nix file is parsed, not evaluated.
nix-parse:
	example/check.sh

# One server and two clients, each its own systemd host, on a private network.
e2e-cluster: build
	e2e/fixtures/build.sh
	e2e/nomad/build.sh >/dev/null
	e2e/cluster/cluster.sh up
	e2e/cluster/cluster.sh test; rc=$$?; e2e/cluster/cluster.sh down; exit $$rc

test: lint unit integration vm nix-parse e2e e2e-cluster

# From nothing to a NixOS-style machine under a Nomad agent; see the README.
demo:
	DEMO_ON_HOST=$(DEMO_ON_HOST) e2e/demo.sh up

demo-stop:
	DEMO_ON_HOST=$(DEMO_ON_HOST) e2e/demo.sh down

testhost-down:
	$(TESTHOST) down

clean: testhost-down
	e2e/cluster/cluster.sh down
	$(VMHOST) down
	rm -rf $(BUILD) $(CONSOLE_HELPER)

# Each figure beside its baseline from the same run, as a ratio: start-to-READY through the driver
# vs bare systemd-run + nspawn, the closure view's cost, 10 starts and stops at once vs one, an
# orderly stop vs bare systemctl stop, 100 machines (time, memory, CPU), console throughput vs a
# guest writing to a file, and closure import vs nix copy.
bench: testhost-ready
	@set -a; . $(FIXTURES_ENV); set +a; export NIXOS_NSPAWN_RCLONE=$(CURDIR)/$(RCLONE); \
	export NIXOS_NSPAWN_PLUGIN=$(CURDIR)/$(PLUGIN); \
	(cd closure && $(CURDIR)/$(TESTHOST) exec $(CURDIR)/$(BUILD)/closure.integration.test \
		-test.run '^$$' -test.bench Import -test.benchtime $(or $(BENCHTIME),5x)); \
	cd driver; \
	$(CURDIR)/$(TESTHOST) exec $(CURDIR)/$(BUILD)/driver.integration.test \
		-test.run '^$$' -test.bench 'StartToReady|StoreView|TimeToAddress|UnitStatus|Concurrency|Stop' -test.benchtime $(or $(BENCHTIME),10x); \
	$(CURDIR)/$(TESTHOST) exec $(CURDIR)/$(BUILD)/driver.integration.test \
		-test.run '^$$' -test.bench ConsoleThroughput -test.benchtime $(or $(BENCHTIME),2x); \
	$(CURDIR)/$(TESTHOST) exec $(CURDIR)/$(BUILD)/driver.integration.test \
		-test.run '^$$' -test.bench Scale -test.benchtime 1x
