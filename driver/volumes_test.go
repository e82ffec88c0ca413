// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package driver

import (
	"testing"

	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/shoenig/test/must"
)

func TestCheckDest(t *testing.T) {
	for _, ok := range []string{"/var/lib/postgresql", "/data", "/srv/a b", "/run/app", "/etcetera", "/nixos"} {
		must.NoError(t, checkDest(ok), must.Sprint(ok))
	}
	for dest, want := range map[string]string{
		"data":              "must be an absolute path",
		"./data":            "must be an absolute path",
		"/":                 "cannot be the machine's root",
		"/nix/store":        "cannot be /nix",
		"/nix/store/x":      "cannot be /nix",
		"/nix":              "cannot be /nix",
		"/secrets":          "cannot be /secrets",
		"/alloc/data":       "cannot be /alloc",
		"/local":            "cannot be /local",
		"/etc":              "cannot be /etc",
		"/etc/ssl/private":  "cannot be /etc",
		"/dev/fuse":         "cannot be /dev",
		"/run/host":         "cannot be /run/host",
		"/run":              "cannot be /run/host",
		"/var/../etc":       "must be a clean path",
		"/data/":            "must be a clean path",
		"/a:b":              "without ':'",
		"/proc/sys/kernel":  "cannot be /proc",
		"/sys/fs/cgroup":    "cannot be /sys",
		"/var//lib":         "must be a clean path",
		"/var/lib/x\x00":    "control characters",
		"/var/lib/x\ny":     "control characters",
		"/srv/back\\slash":  "'\\'",
		"/nix/var/nix/db/x": "cannot be /nix",
	} {
		err := checkDest(dest)
		must.ErrorContains(t, err, want, must.Sprint(dest))
	}
}

// Everything that needs no host path to be checked; volumeBinds' host side runs in the
// integration tests.
func TestVolumeBinds_Refusals(t *testing.T) {
	for _, c := range []struct {
		name  string
		m     drivers.MountConfig
		wants []string
	}{
		{"over the store", drivers.MountConfig{TaskPath: "/nix/store", HostPath: "/srv/data"}, []string{`volume_mount destination = "/nix/store" (host path "/srv/data")`, "cannot be /nix"}},
		{"relative", drivers.MountConfig{TaskPath: "data", HostPath: "/srv/data"}, []string{`volume_mount destination = "data"`, "absolute path"}},
		{"propagation", drivers.MountConfig{TaskPath: "/data", HostPath: "/srv/data", PropagationMode: "bidirectional"}, []string{`propagation_mode = "bidirectional"`, `only "private"`}},
		{"selinux", drivers.MountConfig{TaskPath: "/data", HostPath: "/srv/data", SELinuxLabel: "z"}, []string{`selinux_label = "z"`}},
		{"host path with a colon", drivers.MountConfig{TaskPath: "/data", HostPath: "/srv/a:b"}, []string{"host path must be absolute without ':'"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := volumeBinds([]*drivers.MountConfig{&c.m})
			for _, w := range c.wants {
				must.ErrorContains(t, err, w)
			}
		})
	}
	_, err := volumeBinds([]*drivers.MountConfig{{TaskPath: "/data", HostPath: "/"}, {TaskPath: "/data", HostPath: "/"}})
	must.ErrorContains(t, err, "two volume mounts have this destination")
}
