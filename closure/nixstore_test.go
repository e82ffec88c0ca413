// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package closure

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/shoenig/test/must"
)

const (
	webToplevel = "/nix/store/0c7dzqqvmn0b2smb0fbhdpdy3i5x1iyi-nixos-system-web"
	dbToplevel  = "/nix/store/1b8gk0lpl9qrqvjmzzyh1lpzl2g4r7a6-nixos-system-db"
)

// A closure that is rooted already is rooted under another name without nix-store (false
// here, so any call fails), and its root stays until the last name is removed.
func TestNixStoreRootsShareTheClosureRoot(t *testing.T) {
	ctx := context.Background()
	roots := t.TempDir()
	s, err := NewNixStore("/bin/false", roots, t.TempDir())
	must.NoError(t, err)
	closureRoot := filepath.Join(roots, closureRootsDir, filepath.Base(webToplevel))
	// What nix-store --add-root made for the first name.
	must.NoError(t, os.Symlink(webToplevel, closureRoot))
	must.NoError(t, os.Symlink(webToplevel, filepath.Join(roots, "alloc-1")))

	must.NoError(t, s.AddRoot(ctx, "alloc-2", webToplevel))
	must.Error(t, s.AddRoot(ctx, "alloc-3", dbToplevel), must.Sprint("a closure without a root needs nix-store"))
	_, err = os.Lstat(filepath.Join(roots, "alloc-3"))
	must.True(t, os.IsNotExist(err))

	must.NoError(t, s.RemoveRoot(ctx, "alloc-1"))
	target, err := os.Readlink(closureRoot)
	must.NoError(t, err, must.Sprint("alloc-2 still names the closure"))
	must.Eq(t, webToplevel, target)
	must.NoError(t, s.RemoveRoot(ctx, "alloc-2"))
	_, err = os.Lstat(closureRoot)
	must.True(t, os.IsNotExist(err))
	must.NoError(t, s.RemoveRoot(ctx, "alloc-2"))
}

// Opening the store drops closure roots that no name links to, left by a plugin that died
// between the two.
func TestNewNixStoreDropsUnnamedClosureRoots(t *testing.T) {
	roots := t.TempDir()
	must.NoError(t, os.MkdirAll(filepath.Join(roots, closureRootsDir), 0o755))
	for _, p := range []string{webToplevel, dbToplevel} {
		must.NoError(t, os.Symlink(p, filepath.Join(roots, closureRootsDir, filepath.Base(p))))
	}
	must.NoError(t, os.Symlink(dbToplevel, filepath.Join(roots, "alloc-1")))
	_, err := NewNixStore("/bin/false", roots, t.TempDir())
	must.NoError(t, err)
	entries, err := os.ReadDir(filepath.Join(roots, closureRootsDir))
	must.NoError(t, err)
	must.Len(t, 1, entries)
	must.Eq(t, filepath.Base(dbToplevel), entries[0].Name())
}
