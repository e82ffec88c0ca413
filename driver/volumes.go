// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package driver

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/hashicorp/nomad/plugins/drivers"

	"github.com/nomad-nixos/nomad-driver-nixos/nspawn"
)

// reservedDests are the machine's paths nothing from the host may be bound over or under:
// its store, Nomad's directories the driver binds itself, its own /etc (NixOS activation
// owns it) and what nspawn mounts.
var reservedDests = []string{"/nix", "/secrets", "/alloc", "/local", "/etc", "/proc", "/sys", "/dev", "/run/host"}

// checkDest says why dest cannot be where a host path appears in the machine, or nil.
func checkDest(dest string) error {
	if !filepath.IsAbs(dest) {
		return errors.New("must be an absolute path in the machine, such as \"/var/lib/postgresql\"")
	}
	if filepath.Clean(dest) != dest || !nspawn.Bindable(dest) {
		return errors.New("must be a clean path (no '..', '.', '//' or trailing '/') without ':', '\\' or control characters")
	}
	if dest == "/" {
		return errors.New("cannot be the machine's root")
	}
	for _, r := range reservedDests {
		if dest == r || strings.HasPrefix(dest, r+"/") || strings.HasPrefix(r, dest+"/") {
			return fmt.Errorf("cannot be %s or a path above or below it: the machine's %s is the driver's (reserved: %s)", r, r, strings.Join(reservedDests, ", "))
		}
	}
	return nil
}

// volumeBinds turns the task's volume mounts (Nomad host volumes, CSI volumes) into idmapped
// binds: a guest service's user owns and writes its files as on a real host, and the host
// sees the same UIDs. A filesystem without idmapped mounts is refused rather than shown with
// every file owned by nobody.
func volumeBinds(mounts []*drivers.MountConfig) ([]nspawn.Bind, error) {
	seen := map[string]bool{}
	// What the task says is checked for every mount before the host is looked at.
	for _, m := range mounts {
		field := volumeField(m)
		if err := checkDest(m.TaskPath); err != nil {
			return nil, fmt.Errorf("%s: %w", field, err)
		}
		if seen[m.TaskPath] {
			return nil, fmt.Errorf("%s: two volume mounts have this destination", field)
		}
		seen[m.TaskPath] = true
		switch m.PropagationMode {
		case "", "private":
		default:
			return nil, fmt.Errorf("%s: propagation_mode = %q: only \"private\" is supported; a machine's mounts live in its own user namespace, which host mounts cannot follow into nor leave", field, m.PropagationMode)
		}
		if m.SELinuxLabel != "" {
			return nil, fmt.Errorf("%s: selinux_label = %q: not supported by the nixos-nspawn driver", field, m.SELinuxLabel)
		}
		if !nspawn.Bindable(m.HostPath) {
			return nil, fmt.Errorf("%s: the host path must be absolute without ':', '\\' or control characters (systemd-nspawn's --bind syntax)", field)
		}
	}
	out := make([]nspawn.Bind, 0, len(mounts))
	for _, m := range mounts {
		field := volumeField(m)
		fi, err := os.Stat(m.HostPath)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", field, err)
		}
		if !fi.IsDir() && !fi.Mode().IsRegular() {
			return nil, fmt.Errorf("%s: the host path is a %s, not a directory or file", field, fi.Mode().Type())
		}
		if err := nspawn.CheckIDMap(m.HostPath); err != nil {
			if errors.Is(err, nspawn.ErrNoIDMap) {
				return nil, fmt.Errorf("%s: %w; the machine runs in a user namespace, where the volume's files would all be owned by nobody: put the volume on ext4, xfs, btrfs or tmpfs (Linux 6.3 or later)", field, err)
			}
			return nil, fmt.Errorf("%s: %w", field, err)
		}
		out = append(out, nspawn.Bind{Source: m.HostPath, Dest: m.TaskPath, ReadOnly: m.Readonly, IDMap: true})
	}
	return out, nil
}

func volumeField(m *drivers.MountConfig) string {
	return fmt.Sprintf("volume_mount destination = %q (host path %q)", m.TaskPath, m.HostPath)
}
