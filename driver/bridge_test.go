// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package driver

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/shoenig/test/must"
)

func TestBridgeProblem(t *testing.T) {
	full, partial, empty := t.TempDir(), t.TempDir(), t.TempDir()
	for _, p := range bridgeCNIPlugins {
		must.NoError(t, os.WriteFile(filepath.Join(full, p), []byte("#!/bin/sh\n"), 0o755))
	}
	must.NoError(t, os.WriteFile(filepath.Join(partial, "bridge"), []byte("#!/bin/sh\n"), 0o755))
	// Not executable: CNI could not run it.
	must.NoError(t, os.WriteFile(filepath.Join(partial, "portmap"), []byte("#!/bin/sh\n"), 0o644))

	must.EqOp(t, "", bridgeProblem("257.9-1", full))
	must.EqOp(t, "", bridgeProblem("252.39-1~deb12u1", empty+":"+full))
	must.EqOp(t, `the CNI plugins firewall, host-local, loopback, portmap are not in cni_path = "`+partial+`" (install the CNI reference plugins, e.g. Debian's containernetworking-plugins, and give the plugin config the agent's cni_path)`,
		bridgeProblem("257", partial))
	must.StrContains(t, bridgeProblem("241", full), "systemd 241 has no NetworkNamespacePath= (systemd 242 or later)")
	must.StrContains(t, bridgeProblem("x", full), `systemd reports version "x"`)
}

func TestGroupNetworkRefusesTaskNetworkOptions(t *testing.T) {
	ns := "/proc/self/ns/net"
	iso := &drivers.NetworkIsolationSpec{Mode: drivers.NetIsolationModeGroup, Path: ns}
	for _, tc := range []struct {
		name string
		tc   TaskConfig
		err  string
	}{
		{"nothing set", TaskConfig{}, ""},
		{"network_mode", TaskConfig{NetworkMode: "veth"}, `network_mode = "veth": the task group has a network namespace of its own (network { mode = "bridge" }), which the machine runs in; remove network_mode from the task config (it applies to groups in host mode)`},
		{"network_mode host", TaskConfig{NetworkMode: "host"}, `network_mode = "host": the task group has`},
		{"host_bridge", TaskConfig{HostBridge: "br0"}, `host_bridge = "br0": the task group has`},
		{"ports", TaskConfig{Ports: []string{"http"}}, `ports = ["http"]: the task group has a network namespace of its own (network { mode = "bridge" }), which the machine runs in, and Nomad maps the group's ports into it; remove ports from the task config and give each port of the group's network block its to = <port in the guest>`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.tc.groupNetwork(iso)
			if tc.err == "" {
				must.NoError(t, err)
				return
			}
			must.ErrorContains(t, err, tc.err)
		})
	}
	err := (&TaskConfig{}).groupNetwork(&drivers.NetworkIsolationSpec{Mode: drivers.NetIsolationModeGroup, Path: "/etc/hostname"})
	must.ErrorContains(t, err, "the task group's network namespace /etc/hostname: not a namespace file")
}
