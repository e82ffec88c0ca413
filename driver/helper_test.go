// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package driver

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/shoenig/test/must"
)

func TestInstallConsoleHelper(t *testing.T) {
	dataDir := t.TempDir()
	embedded, err := consoleHelperFS.ReadFile("consolehelper/" + consoleHelperName)
	if err != nil {
		// `go test` without `make build`: the plugin refuses to run, saying how to build it.
		_, err := installConsoleHelper(dataDir)
		must.ErrorIs(t, err, errNoConsoleHelper)
		must.StrContains(t, err.Error(), "make build")
		entries, _ := os.ReadDir(dataDir)
		must.SliceEmpty(t, entries)
		return
	}
	path, err := installConsoleHelper(dataDir)
	must.NoError(t, err)
	must.EqOp(t, filepath.Join(dataDir, "bin"), filepath.Dir(path))
	must.True(t, strings.HasPrefix(filepath.Base(path), "console-"))
	fi, err := os.Stat(path)
	must.NoError(t, err)
	must.EqOp(t, os.FileMode(0o700), fi.Mode().Perm())
	got, err := os.ReadFile(path)
	must.NoError(t, err)
	must.Eq(t, embedded, got)

	// A damaged copy is replaced; the same version is not installed twice.
	must.NoError(t, os.WriteFile(path, []byte("damaged"), 0o755))
	again, err := installConsoleHelper(dataDir)
	must.NoError(t, err)
	must.EqOp(t, path, again)
	got, err = os.ReadFile(path)
	must.NoError(t, err)
	must.Eq(t, embedded, got)
	entries, err := os.ReadDir(filepath.Join(dataDir, "bin"))
	must.NoError(t, err)
	must.Len(t, 1, entries, must.Sprint("no temporary files left"))
}
