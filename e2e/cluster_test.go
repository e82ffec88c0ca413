// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

//go:build e2e && e2e_cluster

// The multi-node scenario: one server and two clients, each its own systemd test host on a private
// network (e2e/cluster/cluster.sh). The test binary runs inside that network's namespace, so the
// helpers of the single-node suite (nomad, api, ...) reach the server at its private address.
// Run: e2e/cluster/cluster.sh up && e2e/cluster/cluster.sh test.

package e2e

import (
	"fmt"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/shoenig/test/must"
	"github.com/shoenig/test/wait"
)

// The server's HTTP API on the private network (cluster.sh's SERVER_ADDR).
const clusterAddr = "http://10.231.0.10:4646"

var clusterClients = []string{"nxcl-client1", "nxcl-client2"}

// onCluster points the helpers at the cluster's server and checks that it is there.
func onCluster(t *testing.T) {
	t.Helper()
	t.Setenv("NOMAD_ADDR", clusterAddr)
	if _, err := nomadErr("status"); err != nil {
		t.Fatalf("the cluster's server does not answer on %s: run `e2e/cluster/cluster.sh up`, then the "+
			"tests with `e2e/cluster/cluster.sh test` (it runs them inside the private network)", clusterAddr)
	}
}

// clusterHost runs a command inside one of the cluster's test hosts (e.g. nxcl-client1).
func clusterHost(t *testing.T, node string, args ...string) string {
	t.Helper()
	cmd := exec.Command(filepath.Join(repoRoot, "e2e", "cluster", "cluster.sh"), append([]string{"exec", node}, args...)...)
	out, err := cmd.CombinedOutput()
	must.NoError(t, err, must.Sprintf("on %s: %s:\n%s", node, strings.Join(args, " "), out))
	return string(out)
}

// clusterMachines lists the driver's machines registered with a host's machined.
func clusterMachines(t *testing.T, node string) []string {
	t.Helper()
	var out []string
	for _, line := range strings.Split(clusterHost(t, node, "machinectl", "list", "--no-legend"), "\n") {
		if f := strings.Fields(line); len(f) > 0 && strings.HasPrefix(f[0], "nomad-") {
			out = append(out, f[0])
		}
	}
	sort.Strings(out)
	return out
}

type clusterAlloc struct {
	ID, NodeID, NodeName        string
	ClientStatus, DesiredStatus string
}

func clusterAllocs(t *testing.T, jobID string) []clusterAlloc {
	t.Helper()
	var allocs []clusterAlloc
	api(t, "/v1/job/"+jobID+"/allocations", &allocs)
	return allocs
}

// count = 4 with a spread over node.unique.id: two machines on each client, each registered with
// that client's machined; stopping the job ends them all.
func TestClusterSpread(t *testing.T) {
	onCluster(t)

	// Both clients are there, ready, with the driver healthy.
	var nodes []struct {
		ID, Name, Status string
		Drivers          map[string]struct{ Detected, Healthy bool }
	}
	api(t, "/v1/nodes", &nodes)
	names := map[string]string{} // node ID -> name
	for _, n := range nodes {
		d := n.Drivers["nixos-nspawn"]
		must.True(t, n.Status == "ready" && d.Detected && d.Healthy, must.Sprintf("node %s: %s", n.Name, pretty(n)))
		names[n.ID] = n.Name
	}
	got := make([]string, 0, len(names))
	for _, n := range names {
		got = append(got, n)
	}
	sort.Strings(got)
	must.Eq(t, clusterClients, got)

	const id = "cluster-spread"
	runJob(t, id, "cluster-spread.nomad.hcl", map[string]any{"toplevel": tiny(t)})

	var allocs []clusterAlloc
	err := wait.InitialSuccess(
		wait.BoolFunc(func() bool {
			allocs = clusterAllocs(t, id)
			n := 0
			for _, a := range allocs {
				if a.ClientStatus == "running" {
					n++
				}
			}
			return n == 4
		}),
		wait.Timeout(2*time.Minute), wait.Gap(250*time.Millisecond),
	).Run()
	must.NoError(t, err, must.Sprintf("4 running allocations never came; last:\n%s", pretty(allocs)))
	must.Len(t, 4, allocs, must.Sprint(pretty(allocs)))

	// Which machines belong on which client.
	want := map[string][]string{}
	for _, a := range allocs {
		must.Eq(t, names[a.NodeID], a.NodeName)
		want[a.NodeName] = append(want[a.NodeName], "nomad-"+a.ID[:8]+"-t")
	}
	for _, node := range clusterClients {
		sort.Strings(want[node])
		t.Logf("%s runs %v", node, want[node])
	}
	for _, node := range clusterClients {
		must.Len(t, 2, want[node], must.Sprintf("the spread should put 2 of 4 on %s; placement: %v", node, want))
	}

	t.Run("each client's machined has its machines", func(t *testing.T) {
		for _, node := range clusterClients {
			must.Eq(t, want[node], clusterMachines(t, node), must.Sprintf("machinectl list on %s", node))
		}
	})

	t.Run("the guests are up and their logs reach the server", func(t *testing.T) {
		for _, a := range allocs {
			waitOutput(t, 30*time.Second, "tinyinit: ready", func() string {
				out, _ := nomadErr("alloc", "logs", a.ID, "t")
				return out
			})
		}
	})

	t.Run("job stop ends every machine on both clients", func(t *testing.T) {
		nomad(t, "job", "stop", "-detach", id)
		err := wait.InitialSuccess(
			wait.BoolFunc(func() bool {
				allocs = clusterAllocs(t, id)
				for _, a := range allocs {
					if a.ClientStatus != "complete" {
						return false
					}
				}
				return true
			}),
			wait.Timeout(time.Minute), wait.Gap(250*time.Millisecond),
		).Run()
		must.NoError(t, err, must.Sprintf("the allocations never completed; last:\n%s", pretty(allocs)))
		for _, node := range clusterClients {
			waitOutput(t, 30*time.Second, "gone", func() string {
				left := clusterMachines(t, node)
				units := strings.TrimSpace(clusterHost(t, node, "sh", "-c", "systemctl list-units --all --no-legend --plain 'nomad-*' | grep -v '^nomad-cluster-agent' || true"))
				links := strings.TrimSpace(clusterHost(t, node, "sh", "-c", "ip -o link | grep -oE 've-nomad[^:@]*|vn-[^:@]*' || true"))
				if len(left) == 0 && units == "" && links == "" {
					return "gone"
				}
				return fmt.Sprintf("%s: machines %v\nunits %s\nlinks %s", node, left, units, links)
			})
		}
	})
}
