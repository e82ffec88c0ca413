// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package driver

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/hashicorp/nomad/plugins/drivers"

	"github.com/nomad-nixos/nomad-driver-nixos/nspawn"
)

// devicePath says whether p can name a host device: a clean absolute path under /dev that
// nspawn's --bind can carry.
func devicePath(p string) bool {
	return strings.HasPrefix(p, "/dev/") && filepath.Clean(p) == p && nspawn.Bindable(p)
}

// parseAllowDevices checks the plugin config's allow_devices.
func parseAllowDevices(list []string) error {
	for i, p := range list {
		if !devicePath(p) {
			return fmt.Errorf("allow_devices[%d] = %q: must be a clean absolute path under /dev, such as \"/dev/fuse\", without ':' or '\\'", i, p)
		}
	}
	return nil
}

// machineDevices are the host devices the machine gets: the task's devices, each one the plugin
// config's allow_devices lists, and what Nomad's device plugins assigned the task (the operator
// installed those plugins, and Nomad scheduled the device for this task). Each is bound at its
// path and allowed in the unit's device policy, which otherwise holds only what a container needs.
func machineDevices(tc *TaskConfig, nomadDevices []*drivers.DeviceConfig, allowed []string) ([]nspawn.Device, error) {
	var out []nspawn.Device
	seen := map[string]bool{}
	for i, p := range tc.Devices {
		field := fmt.Sprintf("devices[%d] = %q", i, p)
		if !slices.Contains(allowed, p) {
			list := "none"
			if len(allowed) > 0 {
				list = strings.Join(allowed, ", ")
			}
			return nil, fmt.Errorf("%s: not allowed by the plugin config (allow_devices: %s); ask the operator to add it to allow_devices", field, list)
		}
		if seen[p] {
			return nil, fmt.Errorf("%s: given twice", field)
		}
		seen[p] = true
		if err := checkDevice(p, "rw"); err != nil {
			return nil, fmt.Errorf("%s: %w", field, err)
		}
		out = append(out, nspawn.Device{Source: p, Dest: p, Access: "rwm"})
	}
	for _, d := range nomadDevices {
		field := fmt.Sprintf("device of a Nomad device plugin, host path %q, task path %q", d.HostPath, d.TaskPath)
		if !devicePath(d.HostPath) || !devicePath(d.TaskPath) {
			return nil, fmt.Errorf("%s: both must be clean absolute paths under /dev without ':' or '\\'", field)
		}
		if seen[d.TaskPath] {
			return nil, fmt.Errorf("%s: the task's devices has it already", field)
		}
		seen[d.TaskPath] = true
		access := d.Permissions
		if access == "" {
			access = "rwm"
		}
		if strings.Trim(access, "rwm") != "" {
			return nil, fmt.Errorf("%s: permissions %q must be letters of r, w and m", field, access)
		}
		if err := checkDevice(d.HostPath, access); err != nil {
			return nil, fmt.Errorf("%s: %w", field, err)
		}
		out = append(out, nspawn.Device{Source: d.HostPath, Dest: d.TaskPath, Access: access})
	}
	return out, nil
}

// checkDevice says why the host path is no device node the machine could open for access ("r",
// "w"), or nil. A link is not followed: systemd's DeviceAllow= and nspawn's bind would resolve
// it each at its own time. The machine's users are in a user namespace that maps none of the
// host's users, so only the node's permissions for others apply to them, its root included.
func checkDevice(p, access string) error {
	fi, err := os.Lstat(p)
	if err != nil {
		return fmt.Errorf("on the host: %w", err)
	}
	if fi.Mode()&fs.ModeDevice == 0 {
		return fmt.Errorf("a %s on the host, not a device node; give the device's own path", strings.TrimSpace(fi.Mode().Type().String()+" file"))
	}
	perm := fi.Mode().Perm()
	if (strings.Contains(access, "r") && perm&0o004 == 0) || (strings.Contains(access, "w") && perm&0o002 == 0) {
		return fmt.Errorf("mode %04o on the host: the machine's users, its root included, see the node as nobody's, so only its permissions for others apply, which do not allow %q; give others access on the host (a udev rule with MODE=\"0666\", as /dev/fuse and /dev/net/tun have)", perm, access)
	}
	return nil
}
