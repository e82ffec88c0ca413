// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

//go:build e2e

package e2e

import (
	"errors"
	"fmt"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/shoenig/test/must"
)

func tiny(t *testing.T) string    { return env(t, "NIXOS_NSPAWN_TINY_TOPLEVEL") }
func systemd(t *testing.T) string { return env(t, "NIXOS_NSPAWN_SYSTEMD_TOPLEVEL") }

func TestNodeFingerprint(t *testing.T) {
	out := nomad(t, "node", "status", "-self", "-verbose")
	for _, attr := range []string{"driver.nixos-nspawn.version", "driver.nixos-nspawn.systemd_version", "driver.nixos-nspawn.cgroup_mode", "driver.nixos-nspawn.machined", "driver.nixos-nspawn.store", "driver.nixos-nspawn.nix_version"} {
		must.StrContains(t, out, attr)
	}
	healthy := false
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) >= 3 && f[0] == "nixos-nspawn" && f[1] == "true" && f[2] == "true" {
			healthy = true
		}
	}
	must.True(t, healthy, must.Sprintf("nixos-nspawn is not detected and healthy:\n%s", out))
}

// A service job booting a systemd guest: what a user looks at.
func TestServiceJob(t *testing.T) {
	runJob(t, "e2e-service", "machine.nomad.hcl", map[string]any{"toplevel": systemd(t), "type": "service"})
	alloc := waitAlloc(t, "e2e-service", 2*time.Minute, "running", running)

	t.Run("readiness event", func(t *testing.T) {
		waitAlloc(t, "e2e-service", 30*time.Second, "the readiness event", func(a allocation) bool {
			return hasEvent(a.TaskStates["t"], "Driver", "Machine is ready")
		})
		must.StrContains(t, nomad(t, "alloc", "status", alloc.ID), "Machine is ready")
	})

	t.Run("logs", func(t *testing.T) {
		waitOutput(t, 30*time.Second, "longrun: started", func() string {
			out, _ := nomadErr("alloc", "logs", alloc.ID, "t")
			return out
		})
	})

	t.Run("exec", func(t *testing.T) {
		must.Eq(t, "systemd\n", nomad(t, "alloc", "exec", "-i=false", "-t=false", "-task", "t", alloc.ID, "/bin/cat", "/proc/1/comm"))
	})

	t.Run("exec with a TTY", func(t *testing.T) {
		// script gives the CLI the terminal a user would have.
		cmd := exec.Command("script", "-qec", fmt.Sprintf("stty cols 91 rows 37; %s alloc exec -t -task t %s /bin/sh -c 'test -t 0 && echo terminal; stty size; exit 5'",
			filepath.Join(repoRoot, "build", "nomad"), alloc.ID), "/dev/null")
		cmd.Env = append(cmd.Environ(), "NOMAD_ADDR="+nomadAddr())
		out, err := cmd.CombinedOutput()
		var ee *exec.ExitError
		must.True(t, errors.As(err, &ee), must.Sprintf("%v: %s", err, out))
		must.Eq(t, 5, ee.ExitCode(), must.Sprint(string(out)))
		must.StrContains(t, string(out), "terminal")
		must.StrContains(t, string(out), "37 91")
	})

	t.Run("exec says why a command cannot run", func(t *testing.T) {
		for _, c := range []struct {
			cmd    string
			code   int
			reason string
		}{
			{"/no/such/cmd", 127, "exec: /no/such/cmd: no such file or directory"},
			{"/etc/passwd", 126, "exec: /etc/passwd: permission denied"},
		} {
			code, stdout, stderr := allocExec(t, alloc.ID, "", c.cmd)
			must.Eq(t, c.code, code, must.Sprintf("stdout %q, stderr %q", stdout, stderr))
			must.StrContains(t, stderr, c.reason)
			must.Eq(t, "", stdout)

			out, code := allocExecTTY(t, alloc.ID, c.cmd)
			must.Eq(t, c.code, code, must.Sprint(out))
			must.StrContains(t, out, c.reason)
		}
	})

	t.Run("stats", func(t *testing.T) {
		// Burn some CPU in the guest so there is something to see.
		go func() {
			_, _ = nomadErr("alloc", "exec", "-i=false", "-t=false", "-task", "t", alloc.ID, "/usr/bin/timeout", "10", "/bin/sh", "-c", "while :; do :; done")
		}()
		var stats struct {
			ResourceUsage struct {
				MemoryStats struct{ RSS, Usage uint64 }
				CpuStats    struct{ TotalTicks, Percent float64 }
			}
		}
		waitOutput(t, 30*time.Second, "busy", func() string {
			api(t, "/v1/client/allocation/"+alloc.ID+"/stats", &stats)
			u := stats.ResourceUsage
			if u.MemoryStats.RSS > 0 && u.CpuStats.TotalTicks > 0 {
				return "busy"
			}
			return pretty(stats)
		})
		out := nomad(t, "alloc", "status", "-stats", alloc.ID)
		must.StrContains(t, out, "Memory Stats")
		must.StrContains(t, out, "CPU Stats")
	})

	t.Run("machinectl sees the machine", func(t *testing.T) {
		must.SliceNotEmpty(t, machinesOnHost(t))
		must.StrContains(t, strings.Join(machinesOnHost(t), " "), "nomad-"+alloc.ID[:8]+"-t")
	})

	t.Run("stop is an orderly shutdown", func(t *testing.T) {
		nomad(t, "job", "stop", "-detach", "e2e-service")
		a := waitAlloc(t, "e2e-service", time.Minute, "completion", func(a allocation) bool { return a.ClientStatus == "complete" })
		must.True(t, hasEvent(a.TaskStates["t"], "Terminated", "Exit Code: 0"), must.Sprint(pretty(a.TaskStates["t"].Events)))
	})
}

// Exec in a guest whose PID 1 is not systemd enters the machine's namespaces.
func TestExecWithoutSystemd(t *testing.T) {
	runJob(t, "e2e-exectiny", "machine.nomad.hcl", map[string]any{"toplevel": tiny(t), "type": "service", "store_view": "host"})
	alloc := waitAlloc(t, "e2e-exectiny", time.Minute, "running", running)
	waitOutput(t, 30*time.Second, "tinyinit: ready", func() string { out, _ := nomadErr("alloc", "logs", alloc.ID, "t"); return out })

	code, stdout, stderr := allocExec(t, alloc.ID, "", "/no/such/cmd")
	must.Eq(t, 127, code, must.Sprintf("stdout %q, stderr %q", stdout, stderr))
	must.StrContains(t, stderr, "exec: /no/such/cmd: no such file or directory")

	code, stdout, stderr = allocExec(t, alloc.ID, "in\n", busybox(t)+"/bin/sh", "-c", "read -r x; echo out $x; cat /proc/1/comm; echo err >&2; exit 3")
	must.Eq(t, 3, code, must.Sprintf("stdout %q, stderr %q", stdout, stderr))
	must.Eq(t, "out in\ninit\n", stdout)
	must.Eq(t, "err\n", stderr)

	out, code := allocExecTTY(t, alloc.ID, "/no/such/cmd")
	must.Eq(t, 127, code, must.Sprint(out))
	must.StrContains(t, out, "exec: /no/such/cmd: no such file or directory")
}

func TestSignal(t *testing.T) {
	runJob(t, "e2e-signal", "machine.nomad.hcl", map[string]any{"toplevel": tiny(t), "type": "service"})
	alloc := waitAlloc(t, "e2e-signal", time.Minute, "running", running)
	waitOutput(t, 30*time.Second, "tinyinit: ready", func() string { out, _ := nomadErr("alloc", "logs", alloc.ID, "t"); return out })
	nomad(t, "alloc", "signal", "-s", "SIGUSR1", alloc.ID, "t")
	waitOutput(t, 30*time.Second, "tinyinit: got signal SIGUSR1", func() string { out, _ := nomadErr("alloc", "logs", alloc.ID, "t"); return out })
}

func TestBatchJobs(t *testing.T) {
	t.Run("exit 0 completes", func(t *testing.T) {
		runJob(t, "e2e-batch0", "machine.nomad.hcl", map[string]any{"toplevel": tiny(t), "init_args": []string{"print=batch-output", "exit=0"}})
		a := waitAlloc(t, "e2e-batch0", time.Minute, "completion", func(a allocation) bool { return a.ClientStatus == "complete" })
		must.True(t, hasEvent(a.TaskStates["t"], "Terminated", "Exit Code: 0"), must.Sprint(pretty(a.TaskStates["t"].Events)))
		must.StrContains(t, nomad(t, "alloc", "logs", a.ID, "t"), "batch-output")
	})
	t.Run("exit 3 fails after the restart policy's attempts", func(t *testing.T) {
		runJob(t, "e2e-batch3", "machine.nomad.hcl", map[string]any{"toplevel": tiny(t), "init_args": []string{"exit=3"}, "restart_attempts": 1})
		a := waitAlloc(t, "e2e-batch3", 2*time.Minute, "failure", func(a allocation) bool { return a.ClientStatus == "failed" })
		ts := a.TaskStates["t"]
		must.True(t, ts.Failed)
		must.Eq(t, 1, ts.Restarts, must.Sprint(pretty(ts.Events)))
		must.True(t, hasEvent(ts, "Terminated", "Exit Code: 3"), must.Sprint(pretty(ts.Events)))
		must.True(t, hasEvent(ts, "Not Restarting", ""), must.Sprint(pretty(ts.Events)))
	})
}

func TestInvalidJob(t *testing.T) {
	runJob(t, "e2e-invalid", "machine.nomad.hcl", map[string]any{"toplevel": "/nix/store/00000000000000000000000000000000-nixos-system-gone"})
	a := waitAlloc(t, "e2e-invalid", time.Minute, "failure", func(a allocation) bool { return a.ClientStatus == "failed" })
	out := nomad(t, "alloc", "status", a.ID)
	// The test host has Nix, so the driver asks it to realise the path; nothing can provide it.
	must.StrContains(t, out, "is not in the host's Nix store and the host's Nix could not realise it", must.Sprint(out))
}

// The plugin dies: the machine runs on, and its later exit is reported.
func TestPluginKilled(t *testing.T) {
	runJob(t, "e2e-pluginkill", "machine.nomad.hcl", map[string]any{"toplevel": tiny(t), "init_args": []string{"exit=7", "sleep=15s"}})
	alloc := waitAlloc(t, "e2e-pluginkill", time.Minute, "running", running)
	waitOutput(t, 30*time.Second, "tinyinit: ready", func() string { out, _ := nomadErr("alloc", "logs", alloc.ID, "t"); return out })
	// The plugin process has no arguments (its console forwarders are another binary).
	host(t, "pkill", "-KILL", "-f", "/plugins/nomad-driver-nixos$")
	time.Sleep(2 * time.Second)
	must.Eq(t, "running", allocations(t, "e2e-pluginkill")[0].ClientStatus)
	a := waitAlloc(t, "e2e-pluginkill", time.Minute, "failure", func(a allocation) bool { return a.ClientStatus == "failed" })
	must.True(t, hasEvent(a.TaskStates["t"], "Terminated", "Exit Code: 7"), must.Sprint(pretty(a.TaskStates["t"].Events)))
}

// The agent is killed and comes back: machines are recovered, not restarted.
func TestAgentKilled(t *testing.T) {
	runJob(t, "e2e-agentkill", "machine.nomad.hcl", map[string]any{"toplevel": tiny(t), "type": "service"})
	alloc := waitAlloc(t, "e2e-agentkill", time.Minute, "running", running)
	machine := "nomad-" + alloc.ID[:8] + "-t"
	leader := strings.TrimSpace(host(t, "machinectl", "show", "-p", "Leader", "--value", machine))
	_, err := strconv.Atoi(leader)
	must.NoError(t, err)

	host(t, "systemctl", "kill", "--kill-whom=main", "-s", "KILL", "nomad-e2e-agent.service")
	host(t, "systemctl", "restart", "nomad-e2e-agent.service")
	waitOutput(t, 2*time.Minute, "ok", func() string {
		if out, err := nomadErr("node", "status", "-self"); err == nil && strings.Contains(out, "ready") {
			return "ok"
		}
		return ""
	})
	waitAlloc(t, "e2e-agentkill", time.Minute, "running", running)
	must.Eq(t, leader, strings.TrimSpace(host(t, "machinectl", "show", "-p", "Leader", "--value", machine)))
	must.Eq(t, 0, allocations(t, "e2e-agentkill")[0].TaskStates["t"].Restarts)
}
