// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package closure

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/nix-community/go-nix/pkg/nar"
)

// Store kinds, as the plugin config and the fingerprint name them.
const (
	// KindHost is the host's Nix store, written through the host's nix-store.
	KindHost = "host"
	// KindDriver is the driver's own store under its data directory, for hosts without Nix.
	KindDriver = "driver"
)

// Store keeps valid store paths. Imports go through stage (per path, any order) and commit (all
// staged paths, references first), so a path is only ever valid with its whole closure.
type Store interface {
	// Kind is KindHost or KindDriver.
	Kind() string
	// Dir is the host directory holding the paths by their base names.
	Dir() string
	// Missing returns which of paths are not valid.
	Missing(ctx context.Context, paths []string) (map[string]bool, error)
	// Requisites is the closure of a valid path, the path included.
	Requisites(ctx context.Context, p string) ([]string, error)
	// AddRoot keeps p's closure alive under name until RemoveRoot(name).
	AddRoot(ctx context.Context, name, p string) error
	// RemoveRoot drops the root; a root that does not exist is no error.
	RemoveRoot(ctx context.Context, name string) error

	// stage prepares writing one path's NAR into tmp.
	stage(tmp string, info *PathInfo) (stager, error)
	// commit makes the staged paths valid, in the order given.
	commit(ctx context.Context, tmp string, infos []*PathInfo) error
	// tempDir is where import staging directories go.
	tempDir() string
}

// stager receives one NAR: the raw bytes through raw (nil if not wanted) and the entries
// through entry. discard removes what was written, for a retry.
type stager interface {
	raw() io.Writer
	entry(h *nar.Header, body io.Reader) error
	finish() error
	discard() error
}

// CheckToplevel checks a valid toplevel in dir for the NixOS container contract: an executable
// init and no kernel.
func CheckToplevel(dir, p string) error {
	base, err := ParsePath(p)
	if err != nil {
		return err
	}
	host := filepath.Join(dir, base)
	var t topInfo
	fi, err := os.Lstat(host)
	if err != nil {
		return fmt.Errorf("toplevel %s: %w", p, err)
	}
	t.dir = fi.IsDir()
	if ifi, err := os.Lstat(filepath.Join(host, "init")); err == nil {
		t.init = ifi.Mode()&os.ModeSymlink != 0 || (ifi.Mode().IsRegular() && ifi.Mode().Perm()&0o111 != 0)
	}
	if _, err := os.Lstat(filepath.Join(host, "kernel")); err == nil {
		t.kernel = true
	}
	return t.check(p)
}

// newTempDir makes a fresh staging directory for one import.
func newTempDir(s Store) (string, error) {
	if err := os.MkdirAll(s.tempDir(), 0o700); err != nil {
		return "", err
	}
	return os.MkdirTemp(s.tempDir(), "import-")
}

// clearTemp removes staging left by imports that were interrupted (the plugin died). Only one
// plugin uses a data directory, so at start nothing in it is in use.
func clearTemp(s Store) error {
	err := os.RemoveAll(s.tempDir())
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	return err
}
