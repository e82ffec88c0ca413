// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package driver

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/hashicorp/nomad/plugins/shared/structs"

	"github.com/nomad-nixos/nomad-driver-nixos/closure"
)

const attrPrefix = "driver." + PluginName + "."

func (d *Driver) Fingerprint(ctx context.Context) (<-chan *drivers.Fingerprint, error) {
	ch := make(chan *drivers.Fingerprint)
	go func() {
		defer close(ch)
		// The first fingerprint at once: the client waits for it before it registers the node.
		timer := time.NewTimer(0)
		defer timer.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-d.ctx.Done():
				return
			case <-timer.C:
				select {
				case ch <- d.fingerprint(ctx):
				case <-ctx.Done():
					return
				case <-d.ctx.Done():
					return
				}
				timer.Reset(fingerprintPeriod)
			}
		}
	}()
	return ch, nil
}

func (d *Driver) fingerprint(ctx context.Context) *drivers.Fingerprint {
	pc := d.pluginConfig()
	fp := &drivers.Fingerprint{
		Attributes: map[string]*structs.Attribute{
			attrPrefix + "version": structs.NewStringAttribute(PluginVersion),
		},
		Health:            drivers.HealthStateHealthy,
		HealthDescription: drivers.DriverHealthy,
	}
	if !pc.Enabled {
		fp.Health, fp.HealthDescription = drivers.HealthStateUndetected, "disabled in the plugin config"
		return fp
	}
	var problems []string
	if os.Geteuid() != 0 {
		problems = append(problems, "the plugin does not run as root (on NixOS set services.nomad.dropPrivileges = false)")
	}
	for _, tool := range []struct{ field, path string }{
		{"nspawn_path", pc.NspawnPath}, {"systemd_run_path", pc.SystemdRunPath},
		{"nsenter_path", pc.NsenterPath},
	} {
		if fi, err := os.Stat(tool.path); err != nil || fi.IsDir() || fi.Mode().Perm()&0o111 == 0 {
			problems = append(problems, fmt.Sprintf("%s: no executable at %s", tool.field, tool.path))
		}
	}
	d.mu.RLock()
	cg := d.cgroups
	d.mu.RUnlock()
	if cg.Mode != "" {
		fp.Attributes[attrPrefix+"cgroup_mode"] = structs.NewStringAttribute(string(cg.Mode))
	}
	if im := d.importer(); im != nil {
		fp.Attributes[attrPrefix+"store"] = structs.NewStringAttribute(im.Store().Kind())
	}
	if v, err := closure.NixVersion(pc.NixStorePath); err == nil {
		fp.Attributes[attrPrefix+"nix_version"] = structs.NewStringAttribute(v)
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	// Why bridge mode cannot be used here, told as a warning: the driver is healthy without it.
	var bridge string
	if v, err := d.mgr.SystemdVersion(ctx); err != nil {
		problems = append(problems, fmt.Sprintf("systemd is not reachable over D-Bus: %v", err))
	} else {
		fp.Attributes[attrPrefix+"systemd_version"] = structs.NewStringAttribute(v)
		if p := systemdProblem(v); p != "" {
			problems = append(problems, p)
		}
		bridge = bridgeProblem(v, pc.CNIPath)
		fp.Attributes[attrPrefix+"bridge"] = structs.NewBoolAttribute(bridge == "")
	}
	machined := d.mgr.MachinedReachable()
	fp.Attributes[attrPrefix+"machined"] = structs.NewBoolAttribute(machined == nil)
	if machined != nil {
		problems = append(problems, fmt.Sprintf("systemd-machined is not reachable: %v", machined))
	}
	if len(problems) > 0 {
		fp.Health = drivers.HealthStateUnhealthy
		fp.HealthDescription = strings.Join(problems, "; ")
		return fp
	}
	warnings := d.networkWarnings(ctx, fp)
	if w := inotifyWarning(fp); w != "" {
		warnings = append(warnings, w)
	}
	if bridge != "" {
		warnings = append(warnings, "bridge mode unavailable: "+bridge)
	}
	if len(warnings) > 0 {
		fp.HealthDescription += "; warning: " + strings.Join(warnings, "; ")
	}
	return fp
}

// Inotify instances a machine takes from root's fs.inotify.max_user_instances: those of a user
// namespace count against its owner's, so a NixOS guest's systemd (5), D-Bus and logind (1 each)
// do, and its console forwarder (1).
const (
	nixosInotifyInstances = 8
	// minInotifyInstances is where the warning stops: 128 machines of that kind.
	minInotifyInstances = 128 * nixosInotifyInstances
)

// inotifyWarning reports a limit of inotify instances that holds few machines: a guest that finds
// none left runs degraded (its path units fail), and the kernel's default (128) holds fewer than 16.
func inotifyWarning(fp *drivers.Fingerprint) string {
	b, err := os.ReadFile("/proc/sys/fs/inotify/max_user_instances")
	if err != nil {
		return ""
	}
	limit, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return ""
	}
	fp.Attributes[attrPrefix+"inotify_instances"] = structs.NewIntAttribute(int64(limit), "")
	if limit >= minInotifyInstances {
		return ""
	}
	return fmt.Sprintf("fs.inotify.max_user_instances is %d, and each NixOS machine takes about %d of root's, so about %d fit; raise it to %d or more (sysctl, or example/modules/host.nix on NixOS)",
		limit, nixosInotifyInstances, limit/nixosInotifyInstances, minInotifyInstances)
}

// networkWarnings reports what keeps veth machines from reaching beyond the host: IP
// forwarding. Their addresses come from the driver, so they need no DHCP server on the host;
// whether systemd-networkd runs is reported for guests on a host_bridge that want one.
func (d *Driver) networkWarnings(ctx context.Context, fp *drivers.Fingerprint) []string {
	var warnings []string
	networkd, err := d.mgr.Status(ctx, "systemd-networkd.service")
	running := err == nil && networkd.ActiveState == "active"
	fp.Attributes[attrPrefix+"networkd"] = structs.NewBoolAttribute(running)
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_forward")
	forwarding := err == nil && strings.TrimSpace(string(b)) == "1"
	fp.Attributes[attrPrefix+"ip_forward"] = structs.NewBoolAttribute(forwarding)
	if !forwarding {
		warnings = append(warnings, "IPv4 forwarding is off, so veth machines reach only the host")
	}
	return warnings
}
