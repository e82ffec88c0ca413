// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package nspawn

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/coreos/go-systemd/v22/unit"
)

// The guest's systemd turns every mount it finds into a mount unit and unmounts it at poweroff.
// The driver's binds reach a machine with a user namespace as locked mounts (mount_namespaces(7)),
// which the guest cannot unmount: each attempt fails with EINVAL and, on systemd 252 and 257
// under systemd-nspawn 257, the failures restart one another until the stop times out. A drop-in
// with DefaultDependencies=no takes these units out of the shutdown (no Conflicts=umount.target).
// It goes to /etc/systemd/system.control, a directory of the root that NixOS activation leaves
// alone (its /etc/systemd/system is a link into the closure).
const (
	mountDropinDir  = "etc/systemd/system.control"
	mountDropinName = "50-nomad-driver-nixos.conf"
	mountDropin     = "# Written by nomad-driver-nixos: this mount is the container manager's, locked in the\n" +
		"# machine's user namespace; it cannot be unmounted from here, so poweroff leaves it alone.\n" +
		"[Unit]\nDefaultDependencies=no\n"
)

// GuestMounts are the machine's mount points that the driver binds: its /nix/store (and the
// paths in it, whose drop-in is shared), the task's directories, volumes and binds, and its
// devices.
func (s *Spec) GuestMounts() []string {
	mounts := []string{guestStore}
	for _, b := range s.Binds {
		mounts = append(mounts, b.Dest)
	}
	for _, d := range s.Devices {
		mounts = append(mounts, d.Dest)
	}
	return mounts
}

// WriteMountDropins writes, into a prepared root, the drop-ins that keep the guest's systemd from
// unmounting mounts at poweroff. The mounts below /nix/store share one: systemd (from 239 on)
// reads the drop-ins of each prefix of a unit's name cut after a dash too, and theirs all start
// with "nix-store-"; a closure of a thousand paths had cost a thousand drop-ins at each start.
func WriteMountDropins(root string, mounts []string) error {
	var names []string
	for _, m := range mounts {
		names = append(names, unit.UnitNamePathEscape(m))
		if m == guestStore {
			names = append(names, unit.UnitNamePathEscape(guestStore)+"-")
		}
	}
	for _, name := range names {
		dir := filepath.Join(root, mountDropinDir, name+".mount.d")
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return fmt.Errorf("writing the machine's mount drop-ins: %w", err)
		}
		if err := os.WriteFile(filepath.Join(dir, mountDropinName), []byte(mountDropin), 0o644); err != nil {
			return fmt.Errorf("writing the machine's mount drop-ins: %w", err)
		}
	}
	return nil
}
