// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package nspawn

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/shoenig/test/must"
)

func TestGuestMounts(t *testing.T) {
	s := Spec{
		Store: StoreView{
			Paths: []string{"abc-hello", "def-link"},
			Links: map[string]string{"def-link": "abc-hello"},
		},
		Binds:   []Bind{{Source: "/a", Dest: "/alloc"}, {Source: "/a/logs", Dest: "/alloc/logs", ReadOnly: true}, {Source: "/srv/pg", Dest: "/var/lib/postgresql", IDMap: true}},
		Devices: []Device{{Source: "/dev/fuse", Dest: "/dev/fuse", Access: "rwm"}},
	}
	must.Eq(t, []string{"/nix/store", "/alloc", "/alloc/logs", "/var/lib/postgresql", "/dev/fuse"}, s.GuestMounts())
}

// The store's paths share the drop-in of the prefix of their mount units' names.
func TestWriteMountDropins(t *testing.T) {
	root := t.TempDir()
	must.NoError(t, WriteMountDropins(root, []string{"/nix/store", "/alloc/logs", "/local"}))
	for _, unit := range []string{"nix-store.mount", "nix-store-.mount", "alloc-logs.mount", "local.mount"} {
		b, err := os.ReadFile(filepath.Join(root, "etc/systemd/system.control", unit+".d", "50-nomad-driver-nixos.conf"))
		must.NoError(t, err, must.Sprint(unit))
		must.StrContains(t, string(b), "[Unit]\nDefaultDependencies=no\n")
	}
}
