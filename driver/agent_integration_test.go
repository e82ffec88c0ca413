// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

//go:build integration

package driver

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/shoenig/test/must"
	"github.com/shoenig/test/wait"

	"github.com/nomad-nixos/nomad-driver-nixos/nspawn"
)

// Under a real Nomad agent on cgroup v2, a task with `cores = 1` gets a core to itself: its
// machine runs there, and the machine of a task on the shared cores does not. make vm runs it
// with the agent binary (NIXOS_NSPAWN_NOMAD) and the plugin (NIXOS_NSPAWN_PLUGIN).
func TestCgroupV2AgentCores(t *testing.T) {
	requireCgroupV2(t)
	nomad, plugin := os.Getenv("NIXOS_NSPAWN_NOMAD"), os.Getenv("NIXOS_NSPAWN_PLUGIN")
	if nomad == "" || plugin == "" {
		t.Fatal("NIXOS_NSPAWN_NOMAD and NIXOS_NSPAWN_PLUGIN must name the agent and the plugin binary: run through make vm")
	}
	dir := t.TempDir()
	pluginDir := filepath.Join(dir, "plugins")
	must.NoError(t, os.Mkdir(pluginDir, 0o755))
	must.NoError(t, os.Symlink(plugin, filepath.Join(pluginDir, "nomad-driver-nixos")))
	config := filepath.Join(dir, "agent.hcl")
	must.NoError(t, os.WriteFile(config, []byte(fmt.Sprintf(`
plugin "nomad-driver-nixos" {
  config {
    data_dir = %q
  }
}
`, filepath.Join(dir, "driver"))), 0o644))
	agent := exec.Command(nomad, "agent", "-dev", "-bind=127.0.0.1", "-plugin-dir="+pluginDir, "-config="+config)
	logf, err := os.Create(filepath.Join(dir, "agent.log"))
	must.NoError(t, err)
	agent.Stdout, agent.Stderr = logf, logf
	must.NoError(t, agent.Start())
	machines := map[string]string{}
	t.Cleanup(func() {
		// A client leaves its tasks running when it shuts down: stop them first.
		_ = exec.Command(nomad, "job", "stop", "-purge", "cores").Run()
		err := wait.InitialSuccess(
			wait.BoolFunc(func() bool {
				list := run(t, "machinectl", "list", "--no-legend")
				for _, m := range machines {
					if strings.Contains(list, m) {
						return false
					}
				}
				return true
			}),
			wait.Timeout(scaled(time.Minute)), wait.Gap(time.Second),
		).Run()
		_ = agent.Process.Signal(os.Interrupt)
		_ = agent.Wait()
		if err != nil {
			t.Errorf("the job's machines %v outlived it: %v", machines, err)
		}
		if t.Failed() {
			b, _ := os.ReadFile(logf.Name())
			t.Logf("agent log:\n%s", b)
		}
	})
	api := func(path string, v any) error {
		resp, err := http.Get("http://127.0.0.1:4646" + path)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		return json.NewDecoder(resp.Body).Decode(v)
	}
	must.Wait(t, wait.InitialSuccess(
		wait.BoolFunc(func() bool {
			var nodes []struct {
				Status  string
				Drivers map[string]struct{ Healthy bool }
			}
			return api("/v1/nodes", &nodes) == nil && len(nodes) == 1 && nodes[0].Status == "ready" && nodes[0].Drivers["nixos-nspawn"].Healthy
		}),
		wait.Timeout(scaled(time.Minute)), wait.Gap(time.Second),
	), must.Sprint("the agent's node never became ready with a healthy nixos-nspawn driver"))

	out, err := exec.Command(nomad, "job", "run", "-detach", "-var", "toplevel="+tinyToplevel(t), "../e2e/jobs/cores.nomad.hcl").CombinedOutput()
	must.NoError(t, err, must.Sprint(string(out)))
	must.Wait(t, wait.InitialSuccess(
		wait.BoolFunc(func() bool {
			var allocs []struct {
				ID, TaskGroup, ClientStatus string
			}
			if api("/v1/job/cores/allocations", &allocs) != nil {
				return false
			}
			for _, a := range allocs {
				if a.ClientStatus == "running" {
					m, err := nspawn.MachineName(a.ID, a.TaskGroup)
					must.NoError(t, err)
					machines[a.TaskGroup] = m
				}
			}
			return len(machines) == 2
		}),
		wait.Timeout(scaled(time.Minute)), wait.Gap(time.Second),
	), must.Sprint("the job's two allocations did not run"))

	cpus := func(task string) string {
		cg := strings.TrimSpace(run(t, "systemctl", "show", "-P", "ControlGroup", nspawn.UnitName(machines[task])))
		return cgValue(t, filepath.Join("/sys/fs/cgroup", cg), "cpuset.cpus.effective")
	}
	reserved := cpus("reserved")
	must.StrNotContains(t, reserved, ",", must.Sprintf("one reserved core, not %q", reserved))
	must.StrNotContains(t, reserved, "-", must.Sprintf("one reserved core, not %q", reserved))
	share := cgValue(t, "/sys/fs/cgroup/nomad.slice/share.slice", "cpuset.cpus.effective")
	shareMask, err := nspawn.CPUMask(share)
	must.NoError(t, err)
	reservedMask, err := nspawn.CPUMask(reserved)
	must.NoError(t, err)
	for i := range min(len(shareMask), len(reservedMask)) {
		must.Zero(t, shareMask[i]&reservedMask[i], must.Sprintf("Nomad's share partition %q still holds the reserved core %q", share, reserved))
	}
	must.Wait(t, wait.InitialSuccess(
		wait.BoolFunc(func() bool { return cpus("shared") == share }),
		wait.Timeout(scaled(30*time.Second)), wait.Gap(500*time.Millisecond),
	), must.Sprintf("the shared machine runs on %q, Nomad's share partition is %q (reserved: %q)", cpus("shared"), share, reserved))
}
