// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package driver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/hashicorp/nomad/plugins/drivers"
	"golang.org/x/sys/unix"

	"github.com/nomad-nixos/nomad-driver-nixos/nspawn"
)

// defaultCNIPath is Nomad's default cni_path and where Debian's containernetworking-plugins
// puts them.
const defaultCNIPath = "/opt/cni/bin:/usr/lib/cni"

// bridgeCNIPlugins are the CNI plugins Nomad's bridge mode chains (loopback, bridge with
// host-local addresses, firewall, portmap).
var bridgeCNIPlugins = []string{"bridge", "firewall", "host-local", "loopback", "portmap"}

// groupNamespaceSystemd is the systemd that has NetworkNamespacePath=, which starts nspawn in
// the group's namespace.
const groupNamespaceSystemd = 242

// bridgeProblem is why the driver cannot run machines in a bridge-mode group's namespace on this
// host, or "": systemd must start nspawn inside the namespace, and Nomad needs the CNI plugins
// to make it.
func bridgeProblem(systemd, cniPath string) string {
	var problems []string
	if major, _, err := systemdVersion(systemd); err != nil {
		problems = append(problems, err.Error())
	} else if major < groupNamespaceSystemd {
		problems = append(problems, fmt.Sprintf("systemd %s has no NetworkNamespacePath= (systemd %d or later)", systemd, groupNamespaceSystemd))
	}
	if missing := missingCNIPlugins(cniPath); len(missing) > 0 {
		problems = append(problems, fmt.Sprintf("the CNI plugins %s are not in cni_path = %q (install the CNI reference plugins, e.g. Debian's containernetworking-plugins, and give the plugin config the agent's cni_path)", strings.Join(missing, ", "), cniPath))
	}
	return strings.Join(problems, "; ")
}

// missingCNIPlugins are the bridge-mode plugins found in none of the directories of cniPath.
func missingCNIPlugins(cniPath string) []string {
	var missing []string
	for _, p := range bridgeCNIPlugins {
		found := false
		for _, dir := range filepath.SplitList(cniPath) {
			if fi, err := os.Stat(filepath.Join(dir, p)); err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o111 != 0 {
				found = true
				break
			}
		}
		if !found {
			missing = append(missing, p)
		}
	}
	return missing
}

// groupNetwork checks a task config for a group with a network namespace of its own (bridge,
// none or cni/* mode): the machine runs in that namespace, so the task's own network options
// have nothing to say.
func (c *TaskConfig) groupNetwork(iso *drivers.NetworkIsolationSpec) error {
	const why = "the task group has a network namespace of its own (network { mode = \"bridge\" }), which the machine runs in"
	switch {
	case c.NetworkMode != "":
		return fmt.Errorf("network_mode = %q: %s; remove network_mode from the task config (it applies to groups in host mode)", c.NetworkMode, why)
	case c.HostBridge != "":
		return fmt.Errorf("host_bridge = %q: %s; remove host_bridge from the task config", c.HostBridge, why)
	case len(c.Ports) > 0:
		return fmt.Errorf("ports = %q: %s, and Nomad maps the group's ports into it; remove ports from the task config and give each port of the group's network block its to = <port in the guest>", c.Ports, why)
	}
	if iso.Path == "" {
		return errors.New("the task group's network namespace came from Nomad without a path")
	}
	if err := isNetNamespace(iso.Path); err != nil {
		return fmt.Errorf("the task group's network namespace %s: %w", iso.Path, err)
	}
	return nil
}

// isNetNamespace says whether path is a network namespace (a bind mount of an nsfs file).
func isNetNamespace(path string) error {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return err
	}
	if st.Type != unix.NSFS_MAGIC {
		return errors.New("not a namespace file")
	}
	return nil
}

// groupSpec is the network of a machine in its group's namespace.
func groupSpec(iso *drivers.NetworkIsolationSpec) nspawn.Network {
	return nspawn.Network{Mode: nspawn.NetworkGroup, NamespacePath: iso.Path}
}

// bridgeUsable refuses a task in a group's namespace, with the reason, on a host that cannot run
// one (the fingerprint's driver.nixos-nspawn.bridge is false there).
func (d *Driver) bridgeUsable() error {
	ctx, cancel := context.WithTimeout(d.ctx, 5*time.Second)
	defer cancel()
	v, err := d.mgr.SystemdVersion(ctx)
	if err != nil {
		return fmt.Errorf("the task group's network namespace (bridge mode): systemd is not reachable over D-Bus: %w", err)
	}
	if p := bridgeProblem(v, d.pluginConfig().CNIPath); p != "" {
		return fmt.Errorf("the task group's network namespace (bridge mode) cannot be used on this host: %s", p)
	}
	return nil
}
