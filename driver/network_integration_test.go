// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

//go:build integration

package driver

import (
	"fmt"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/nomad/helper/uuid"
	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/shoenig/test/must"
)

// interfaces lists the network interfaces the guest sees.
func (td *testDriver) interfaces(t *testing.T, cfg *drivers.TaskConfig) []string {
	t.Helper()
	waitLog(t, cfg, "longrun: started", 2*time.Minute)
	res, err := td.ExecTask(cfg.ID, []string{"/bin/cat", "/proc/net/dev"}, 30*time.Second)
	must.NoError(t, err)
	must.Eq(t, 0, res.ExitResult.ExitCode, must.Sprint(string(res.Stderr)))
	var names []string
	for _, line := range strings.Split(string(res.Stdout), "\n") {
		if name, _, ok := strings.Cut(line, ":"); ok && !strings.Contains(name, "|") {
			names = append(names, strings.TrimSpace(name))
		}
	}
	slices.Sort(names)
	return names
}

func withNetwork(mode, bridge string) taskOpt {
	return func(_ *drivers.TaskConfig, tc *TaskConfig) { tc.NetworkMode, tc.HostBridge = mode, bridge }
}

func TestNetworkModes(t *testing.T) {
	dataDir := t.TempDir()
	td := newTestDriver(t, dataDir)
	before := inventory(t, dataDir)

	t.Run("veth by default", func(t *testing.T) {
		cfg := td.newTask(t, "veth", systemdToplevel(t), nil)
		td.start(t, cfg)
		must.Eq(t, []string{"host0", "lo"}, td.interfaces(t, cfg))
	})

	t.Run("none has loopback only", func(t *testing.T) {
		cfg := td.newTask(t, "nonet", systemdToplevel(t), nil, withNetwork("none", ""))
		td.start(t, cfg)
		must.Eq(t, []string{"lo"}, td.interfaces(t, cfg))
	})

	t.Run("host is refused unless the plugin config allows it", func(t *testing.T) {
		cfg := td.newTask(t, "hostnet", tinyToplevel(t), nil, withNetwork("host", ""))
		_, _, err := td.StartTask(cfg)
		must.ErrorContains(t, err, `network_mode = "host": the plugin config does not allow tasks on the host's network (allow_host_network = false)`)
	})

	t.Run("the task group's network namespace is refused, user namespaces stay on", func(t *testing.T) {
		ns := "nxtest-" + uuid.Generate()[:8]
		run(t, "ip", "netns", "add", ns)
		t.Cleanup(func() { _ = exec.Command("ip", "netns", "delete", ns).Run() })
		cfg := td.newTask(t, "groupnet", systemdToplevel(t), nil)
		cfg.NetworkIsolation = &drivers.NetworkIsolationSpec{Mode: drivers.NetIsolationModeGroup, Path: "/var/run/netns/" + ns}
		_, _, err := td.StartTask(cfg)
		must.ErrorContains(t, err, "cannot be joined: machines run in a user namespace")
	})

	t.Run("host_bridge", func(t *testing.T) {
		bridge := "nxbr" + uuid.Generate()[:6]
		run(t, "ip", "link", "add", bridge, "type", "bridge")
		t.Cleanup(func() { _ = exec.Command("ip", "link", "delete", bridge).Run() })
		cfg := td.newTask(t, "bridged", systemdToplevel(t), nil, withNetwork("veth", bridge))
		td.start(t, cfg)
		must.Eq(t, []string{"host0", "lo"}, td.interfaces(t, cfg))
		must.StrContains(t, run(t, "ip", "-o", "link", "show", "master", bridge), "vb-")

		for _, tc := range []struct{ bridge, want string }{
			{"lo", `host_bridge = "lo": no bridge of that name on this host`},
			{"no/such", `host_bridge = "no/such": must be a network interface name`},
			{"nxnosuchbr0", `host_bridge = "nxnosuchbr0": no bridge of that name on this host`},
		} {
			bad := td.newTask(t, "badbridge", tinyToplevel(t), nil, withNetwork("veth", tc.bridge))
			_, _, err := td.StartTask(bad)
			must.ErrorContains(t, err, tc.want)
		}
	})

	t.Run("host when allowed", func(t *testing.T) {
		allowed := newTestDriver(t, dataDir, func(c *PluginConfig) { c.AllowHostNetwork = true })
		cfg := allowed.newTask(t, "hostnet", systemdToplevel(t), nil, withNetwork("host", ""))
		allowed.start(t, cfg)
		var hostIfaces []string
		for _, line := range strings.Split(run(t, "ip", "-o", "link"), "\n") {
			if f := strings.Fields(line); len(f) > 1 {
				hostIfaces = append(hostIfaces, strings.SplitN(strings.TrimSuffix(f[1], ":"), "@", 2)[0])
			}
		}
		guest := allowed.interfaces(t, cfg)
		for _, name := range guest {
			must.SliceContains(t, hostIfaces, name, must.Sprintf("guest sees %v, host has %v", guest, hostIfaces))
		}
		must.Greater(t, 1, len(guest), must.Sprint(fmt.Sprint(guest)))
		must.NoError(t, allowed.DestroyTask(cfg.ID, true))
	})

	t.Cleanup(func() {
		must.SliceEmpty(t, leftovers(t, dataDir, before), must.Sprint(leftovers(t, dataDir, before)))
	})
}
