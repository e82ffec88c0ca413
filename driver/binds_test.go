// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package driver

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/shoenig/test/must"

	"github.com/nomad-nixos/nomad-driver-nixos/nspawn"
)

func TestParseAllowBindPaths(t *testing.T) {
	dir := t.TempDir()
	link := filepath.Join(t.TempDir(), "link")
	must.NoError(t, os.Symlink(dir, link))
	got, err := parseAllowBindPaths([]string{dir, link})
	must.NoError(t, err)
	real, err := filepath.EvalSymlinks(dir)
	must.NoError(t, err)
	must.Eq(t, []string{real, real}, got)
	for bad, want := range map[string]string{
		"/":                        "would let tasks bind any host directory",
		"srv":                      "clean absolute path",
		"/srv/":                    "clean absolute path",
		"/srv/a:b":                 "without ':'",
		filepath.Join(dir, "none"): "no such file or directory",
	} {
		_, err := parseAllowBindPaths([]string{dir, bad})
		must.ErrorContains(t, err, `allow_bind_paths[1] = "`+bad+`"`)
		must.ErrorContains(t, err, want)
	}
}

// What is refused before the host is looked at, and links out of an allowed directory.
func TestTaskBinds_Refusals(t *testing.T) {
	allowed := t.TempDir()
	outside := t.TempDir()
	must.NoError(t, os.Mkdir(filepath.Join(allowed, "web"), 0o755))
	must.NoError(t, os.Symlink(outside, filepath.Join(allowed, "out")))
	must.NoError(t, os.Symlink("../..", filepath.Join(allowed, "web", "up")))
	must.NoError(t, os.WriteFile(filepath.Join(allowed, "file"), nil, 0o644))
	real, err := parseAllowBindPaths([]string{allowed})
	must.NoError(t, err)
	for _, c := range []struct {
		bind    string
		allowed []string
		want    string
	}{
		{allowed + "/web:/var/lib/web", nil, "binds of host paths are off"},
		{allowed + "/web:/nix/store", real, "the destination cannot be /nix"},
		{allowed + "/web:/secrets", real, "the destination cannot be /secrets"},
		{allowed + "/web:/etc", real, "the destination cannot be /etc"},
		{allowed + "/web:data", real, "the destination must be an absolute path"},
		{allowed + "/web:/data:rx", real, `or "HOST:DEST:ro"`},
		{"web:/data", real, "host path must be a clean absolute path"},
		{allowed + "/../etc:/data", real, "host path must be a clean absolute path"},
		{outside + ":/data", real, "not below any directory of the plugin config's allow_bind_paths"},
		{allowed + "/out:/data", real, "a link leads out of"},
		{allowed + "/web/up/etc:/data", real, "a link leads out of"},
		{allowed + "/file:/data", real, "not a directory"},
		{allowed + "/missing:/data", real, "no such file or directory"},
	} {
		_, err := taskBinds([]string{c.bind}, c.allowed)
		must.ErrorContains(t, err, `binds[0] = "`+c.bind+`"`)
		must.ErrorContains(t, err, c.want)
	}
}

// A relative link that stays inside the allowed directory is followed to where it points; an
// absolute one is refused even when it points inside, as the kernel resolves beneath the
// directory.
func TestTaskBinds_Links(t *testing.T) {
	allowed := t.TempDir()
	must.NoError(t, os.MkdirAll(filepath.Join(allowed, "data", "web"), 0o755))
	must.NoError(t, os.Symlink("data/web", filepath.Join(allowed, "site")))
	must.NoError(t, os.Symlink(filepath.Join(allowed, "data"), filepath.Join(allowed, "abs")))
	real, err := parseAllowBindPaths([]string{allowed})
	must.NoError(t, err)

	binds, err := taskBinds([]string{allowed + "/site:/srv"}, real)
	must.NoError(t, err)
	must.Eq(t, []nspawn.Bind{{Source: real[0] + "/data/web", Dest: "/srv", IDMap: true}}, binds)

	_, err = taskBinds([]string{allowed + "/abs:/srv"}, real)
	must.ErrorContains(t, err, "a link leads out of "+real[0]+", which allow_bind_paths allows, or is absolute")
}
