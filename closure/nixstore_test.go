// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package closure

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/shoenig/test/must"
	"golang.org/x/sys/unix"
)

// testNixStore is a NixStore whose Nix state directory and toplevels are a test's; its
// nix-store is false, so any call fails.
type testNixStore struct {
	*NixStore
	roots, state string
	web, db      string
}

func newTestNixStore(t *testing.T) testNixStore {
	t.Helper()
	ts := testNixStore{roots: filepath.Join(t.TempDir(), "gcroots"), state: t.TempDir()}
	store := t.TempDir()
	ts.web = filepath.Join(store, "0c7dzqqvmn0b2smb0fbhdpdy3i5x1iyi-nixos-system-web")
	ts.db = filepath.Join(store, "1b8gk0lpl9qrqvjmzzyh1lpzl2g4r7a6-nixos-system-db")
	for _, p := range []string{ts.web, ts.db} {
		must.NoError(t, os.Mkdir(p, 0o755))
	}
	ts.open(t)
	return ts
}

func (ts *testNixStore) open(t *testing.T) {
	t.Helper()
	s, err := newNixStore("/bin/false", ts.roots, t.TempDir(), ts.state)
	must.NoError(t, err)
	ts.NixStore = s
}

// closureRoots lists the links in Nix's gcroots directory and their targets.
func (ts testNixStore) closureRootLinks(t *testing.T) map[string]string {
	t.Helper()
	entries, err := os.ReadDir(filepath.Join(ts.state, "gcroots", "nomad-driver-nixos"))
	must.NoError(t, err)
	out := map[string]string{}
	for _, e := range entries {
		target, err := os.Readlink(filepath.Join(ts.state, "gcroots", "nomad-driver-nixos", e.Name()))
		must.NoError(t, err)
		out[e.Name()] = target
	}
	return out
}

// Roots of one closure share one link in Nix's gcroots, which stays until the last name is
// removed; no nix-store runs (false here). A toplevel no longer on disk is not rooted.
func TestNixStoreRootsShareTheClosureRoot(t *testing.T) {
	ctx := context.Background()
	ts := newTestNixStore(t)
	webRoot := ts.rootPrefix + filepath.Base(ts.web)

	must.NoError(t, ts.AddRoot(ctx, "alloc-1", ts.web))
	must.NoError(t, ts.AddRoot(ctx, "alloc-2", ts.web))
	must.Eq(t, map[string]string{webRoot: ts.web}, ts.closureRootLinks(t))
	must.NoError(t, os.Remove(ts.db))
	err := ts.AddRoot(ctx, "alloc-3", ts.db)
	must.ErrorContains(t, err, "left the store")
	_, err = os.Lstat(filepath.Join(ts.roots, "alloc-3"))
	must.True(t, os.IsNotExist(err))

	must.NoError(t, ts.RemoveRoot(ctx, "alloc-1"))
	must.Eq(t, map[string]string{webRoot: ts.web}, ts.closureRootLinks(t), must.Sprint("alloc-2 still names the closure"))
	must.NoError(t, ts.RemoveRoot(ctx, "alloc-2"))
	must.MapEmpty(t, ts.closureRootLinks(t))
	must.NoError(t, ts.RemoveRoot(ctx, "alloc-2"))
}

// A root waits while Nix's garbage collection holds its lock, and fails if the collection
// deleted the closure; it gives up when its context ends.
func TestNixStoreRootWaitsForGarbageCollection(t *testing.T) {
	ctx := context.Background()
	ts := newTestNixStore(t)
	gc, err := os.OpenFile(filepath.Join(ts.state, "gc.lock"), os.O_RDWR|os.O_CREATE, 0o600)
	must.NoError(t, err)
	defer gc.Close()
	must.NoError(t, unix.Flock(int(gc.Fd()), unix.LOCK_EX))

	short, cancel := context.WithTimeout(ctx, 2*gcLockPoll)
	defer cancel()
	must.ErrorContains(t, ts.AddRoot(short, "alloc-1", ts.web), "gc.lock is locked")

	done := make(chan error, 1)
	go func() { done <- ts.AddRoot(ctx, "alloc-1", ts.web) }()
	select {
	case err := <-done:
		t.Fatalf("rooted during a garbage collection: %v", err)
	case <-time.After(3 * gcLockPoll):
	}
	// The collection deletes the closure and ends.
	must.NoError(t, os.Remove(ts.web))
	must.NoError(t, unix.Flock(int(gc.Fd()), unix.LOCK_UN))
	must.ErrorContains(t, <-done, "left the store")
	must.MapEmpty(t, ts.closureRootLinks(t))

	// No collection can start while a closure is being rooted.
	must.NoError(t, ts.AddRoot(ctx, "alloc-2", ts.db))
	must.NoError(t, unix.Flock(int(gc.Fd()), unix.LOCK_EX|unix.LOCK_NB), must.Sprint("the root let the lock go"))
}

// Opening the store drops the closure roots of its data directory that no name links to, left
// by a plugin that died between the two; another data directory's stay.
func TestNewNixStoreDropsUnnamedClosureRoots(t *testing.T) {
	ts := newTestNixStore(t)
	dir := filepath.Join(ts.state, "gcroots", "nomad-driver-nixos")
	for _, p := range []string{ts.web, ts.db} {
		must.NoError(t, os.Symlink(p, filepath.Join(dir, ts.rootPrefix+filepath.Base(p))))
	}
	other := "0123456789ab-" + filepath.Base(ts.web)
	must.NoError(t, os.Symlink(ts.web, filepath.Join(dir, other)))
	must.NoError(t, os.Symlink(ts.db, filepath.Join(ts.roots, "alloc-1")))
	ts.open(t)
	must.Eq(t, map[string]string{ts.rootPrefix + filepath.Base(ts.db): ts.db, other: ts.web}, ts.closureRootLinks(t))
}

// The closure roots of a plugin from before (links in <data dir>/gcroots/.closures, which Nix
// knew as indirect roots) are taken over by the next: the named ones move into Nix's gcroots.
func TestNewNixStoreTakesOverLegacyClosureRoots(t *testing.T) {
	ts := newTestNixStore(t)
	legacy := filepath.Join(ts.roots, legacyClosureRoots)
	must.NoError(t, os.Mkdir(legacy, 0o755))
	for _, p := range []string{ts.web, ts.db} {
		must.NoError(t, os.Symlink(p, filepath.Join(legacy, filepath.Base(p))))
	}
	must.NoError(t, os.Symlink(ts.web, filepath.Join(ts.roots, "alloc-1")))
	// The old roots hold the closures meanwhile: opening the store does not wait for a
	// collection in progress.
	gc, err := os.OpenFile(filepath.Join(ts.state, "gc.lock"), os.O_RDWR|os.O_CREATE, 0o600)
	must.NoError(t, err)
	defer gc.Close()
	must.NoError(t, unix.Flock(int(gc.Fd()), unix.LOCK_EX))
	ts.open(t)
	must.Eq(t, map[string]string{ts.rootPrefix + filepath.Base(ts.web): ts.web}, ts.closureRootLinks(t))
	_, err = os.Lstat(legacy)
	must.True(t, os.IsNotExist(err))
	must.NoError(t, ts.RemoveRoot(context.Background(), "alloc-1"))
	must.MapEmpty(t, ts.closureRootLinks(t))
}
