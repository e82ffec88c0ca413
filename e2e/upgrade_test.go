// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

//go:build e2e

package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/shoenig/test/must"
)

// beforeHardening is the last commit whose machine and console forwarder units had no
// sandboxing: machines it started must survive an upgrade past it.
const beforeHardening = "307977baa37f7b732534768b61667254123734a6"

// placePlugin puts bin where the agent loads its plugin from; the running plugin keeps its own
// file (a new one is renamed over it).
func placePlugin(t *testing.T, bin string) {
	t.Helper()
	dst := filepath.Join(repoRoot, "build", "plugins", "nomad-driver-nixos")
	b, err := os.ReadFile(bin)
	must.NoError(t, err)
	must.NoError(t, os.WriteFile(dst+".upgrade", b, 0o755))
	must.NoError(t, os.Rename(dst+".upgrade", dst))
}

// installPlugin places bin and kills the running plugin, which the agent then starts again from
// there, recovering its tasks: an operator's upgrade of the plugin alone.
func installPlugin(t *testing.T, bin string) {
	t.Helper()
	placePlugin(t, bin)
	host(t, "pkill", "-KILL", "-f", "/plugins/nomad-driver-nixos$")
	waitDriverHealthy(t)
}

// restartAgent restarts the agent in the test host and waits until its driver is healthy.
func restartAgent(t *testing.T) {
	t.Helper()
	host(t, "systemctl", "restart", "nomad-e2e-agent.service")
	waitDriverHealthy(t)
}

func waitDriverHealthy(t *testing.T) {
	t.Helper()
	waitOutput(t, 2*time.Minute, "healthy", func() string {
		out, _ := nomadErr("node", "status", "-self", "-verbose")
		for _, line := range strings.Split(out, "\n") {
			if f := strings.Fields(line); len(f) >= 3 && f[0] == "nixos-nspawn" && f[1] == "true" && f[2] == "true" {
				return "healthy"
			}
		}
		return out
	})
}

// A machine started by the plugin of before the hardening is recovered by today's, keeps its
// console flowing, and stops cleanly.
func TestUpgradeRecoversOlderMachines(t *testing.T) {
	old := t.TempDir()
	archive := exec.Command("sh", "-c", "git -C \"$1\" archive \"$2\" | tar -x -C \"$3\"", "sh", repoRoot, beforeHardening, old)
	out, err := archive.CombinedOutput()
	must.NoError(t, err, must.Sprintf("git archive %s: %s", beforeHardening, out))
	build := exec.Command("make", "-C", old, "build")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	out, err = build.CombinedOutput()
	must.NoError(t, err, must.Sprintf("building the plugin of %s: %s", beforeHardening, out))
	current := filepath.Join(repoRoot, "build", "nomad-driver-nixos")
	// The old plugin knows only the options of its day: the agent runs it with the README's
	// configuration, and goes back to the suite's own (with its caches) at the end.
	config := filepath.Join(repoRoot, "build", "agent.hcl")
	full, err := os.ReadFile(config)
	must.NoError(t, err)
	t.Cleanup(func() {
		installPlugin(t, current)
		must.NoError(t, os.WriteFile(config, full, 0o644))
		restartAgent(t)
	})
	base, err := os.ReadFile(filepath.Join(repoRoot, "build", "agent-base.hcl"))
	must.NoError(t, err)
	must.NoError(t, os.WriteFile(config, base, 0o644))
	placePlugin(t, filepath.Join(old, "build", "nomad-driver-nixos"))
	restartAgent(t)
	runJob(t, "e2e-upgrade", "machine.nomad.hcl", map[string]any{"toplevel": tiny(t), "type": "service"})
	alloc := waitAlloc(t, "e2e-upgrade", time.Minute, "running", running)
	logs := func() string { out, _ := nomadErr("alloc", "logs", alloc.ID, "t"); return out }
	waitOutput(t, 30*time.Second, "tinyinit: ready", logs)
	machine := "nomad-" + alloc.ID[:8] + "-t"
	forwarder := machine + "-console.service"
	show := func(prop string) string {
		return strings.TrimSpace(host(t, "systemctl", "show", "-P", prop, forwarder))
	}
	must.EqOp(t, "active", show("ActiveState"))
	must.EqOp(t, "no", show("ProtectSystem"), must.Sprint("the old plugin's forwarder is not sandboxed"))
	leader := strings.TrimSpace(host(t, "machinectl", "show", "-p", "Leader", "--value", machine))

	installPlugin(t, current)
	a := waitAlloc(t, "e2e-upgrade", time.Minute, "running", running)
	must.Eq(t, 0, a.TaskStates["t"].Restarts)
	must.Eq(t, leader, strings.TrimSpace(host(t, "machinectl", "show", "-p", "Leader", "--value", machine)))
	// The old forwarder goes on as it was started.
	must.EqOp(t, "active", show("ActiveState"))
	must.EqOp(t, "no", show("ProtectSystem"))
	nomad(t, "alloc", "signal", "-s", "SIGUSR2", alloc.ID, "t")
	waitOutput(t, 30*time.Second, "tinyinit: got signal SIGUSR2", logs)

	nomad(t, "job", "stop", "-detach", "e2e-upgrade")
	waitAlloc(t, "e2e-upgrade", time.Minute, "the stop", func(a allocation) bool { return a.ClientStatus != "running" })
	waitOutput(t, 30*time.Second, "gone", func() string {
		if strings.Contains(host(t, "systemctl", "list-units", "--all", "--no-legend", "--plain", machine+"*"), machine) {
			return "units left"
		}
		return "gone"
	})
	must.StrContains(t, logs(), "tinyinit: poweroff")
}
