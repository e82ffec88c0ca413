// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package closure

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// OwnStore is the driver's own store, for hosts without a writable Nix store. Paths live in
// Dir by base name; a path is valid only once its metadata is in .meta, which commit writes
// after the path is complete, and never written into a host /nix/store.
type OwnStore struct {
	dir string
}

const (
	metaDir  = ".meta"
	rootsDir = ".roots"
	tmpDir   = ".tmp"
)

// NewOwnStore opens (creating) the store in dir and drops staging that interrupted imports left.
func NewOwnStore(dir string) (*OwnStore, error) {
	s := &OwnStore{dir: dir}
	for _, d := range []string{dir, s.metaDir(), s.rootsDir()} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, err
		}
	}
	if err := clearTemp(s); err != nil {
		return nil, err
	}
	return s, nil
}

func (s *OwnStore) Kind() string    { return KindDriver }
func (s *OwnStore) Dir() string     { return s.dir }
func (s *OwnStore) tempDir() string { return filepath.Join(s.dir, tmpDir) }
func (s *OwnStore) metaDir() string { return filepath.Join(s.dir, metaDir) }
func (s *OwnStore) rootsDir() string {
	return filepath.Join(s.dir, rootsDir)
}

func (s *OwnStore) metaPath(base string) string {
	return filepath.Join(s.metaDir(), base+".json")
}

func (s *OwnStore) info(p string) (*PathInfo, error) {
	base, err := ParsePath(p)
	if err != nil {
		return nil, err
	}
	b, err := os.ReadFile(s.metaPath(base))
	if err != nil {
		return nil, err
	}
	var info PathInfo
	if err := json.Unmarshal(b, &info); err != nil {
		return nil, fmt.Errorf("store metadata of %s: %w", p, err)
	}
	if _, err := os.Lstat(filepath.Join(s.dir, base)); err != nil {
		return nil, err
	}
	return &info, nil
}

func (s *OwnStore) Missing(_ context.Context, paths []string) (map[string]bool, error) {
	out := map[string]bool{}
	for _, p := range paths {
		if _, err := s.info(p); err != nil {
			if !errors.Is(err, os.ErrNotExist) {
				return nil, err
			}
			out[p] = true
		}
	}
	return out, nil
}

func (s *OwnStore) Requisites(_ context.Context, p string) ([]string, error) {
	seen := map[string]bool{p: true}
	queue := []string{p}
	for len(queue) > 0 {
		cur := queue[0]
		queue = queue[1:]
		info, err := s.info(cur)
		if err != nil {
			return nil, fmt.Errorf("closure of %s: %s: %w", p, cur, err)
		}
		for _, r := range info.References {
			if !seen[r] {
				seen[r] = true
				queue = append(queue, r)
			}
		}
	}
	out := make([]string, 0, len(seen))
	for q := range seen {
		out = append(out, q)
	}
	sort.Strings(out)
	return out, nil
}

func (s *OwnStore) stage(tmp string, info *PathInfo) (stager, error) {
	base, err := ParsePath(info.Path)
	if err != nil {
		return nil, err
	}
	return &ownStager{unpacker: unpacker{dst: filepath.Join(tmp, base)}}, nil
}

type ownStager struct{ unpacker }

func (o *ownStager) raw() io.Writer { return nil }

func (o *ownStager) discard() error {
	o.dirs = nil
	return os.RemoveAll(o.dst)
}

func (s *OwnStore) commit(_ context.Context, tmp string, infos []*PathInfo) error {
	var metas []*PathInfo
	for _, info := range infos {
		base, _ := ParsePath(info.Path)
		if _, err := s.info(info.Path); err == nil {
			continue
		}
		dst := filepath.Join(s.dir, base)
		// A path without metadata is the remains of an interrupted commit.
		if err := os.RemoveAll(dst); err != nil {
			return err
		}
		if err := os.Rename(filepath.Join(tmp, base), dst); err != nil {
			return err
		}
		metas = append(metas, info)
	}
	// The paths reach the disk before the metadata that makes them valid.
	if err := syncfs(s.dir); err != nil {
		return err
	}
	for _, info := range metas {
		base, _ := ParsePath(info.Path)
		b, err := json.Marshal(info)
		if err != nil {
			return err
		}
		if err := writeFileAtomic(s.metaPath(base), b); err != nil {
			return err
		}
	}
	return nil
}

func (s *OwnStore) AddRoot(_ context.Context, name, p string) error {
	if err := checkRootName(name); err != nil {
		return err
	}
	return writeFileAtomic(filepath.Join(s.rootsDir(), name), []byte(p))
}

// RemoveRoot marks the root's closure as used now, so garbage collection keeps it for the grace
// period, then removes the root.
func (s *OwnStore) RemoveRoot(ctx context.Context, name string) error {
	if err := checkRootName(name); err != nil {
		return err
	}
	f := filepath.Join(s.rootsDir(), name)
	b, err := os.ReadFile(f)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	// The metadata's modification time is when the path was last used.
	now := time.Now()
	if paths, err := s.Requisites(ctx, string(b)); err == nil {
		for _, p := range paths {
			base, _ := ParsePath(p)
			_ = os.Chtimes(s.metaPath(base), now, now)
		}
	}
	return os.Remove(f)
}

// collect removes paths that no root needs and that nothing used within grace, and the remains
// of interrupted commits. It returns the removed paths.
func (s *OwnStore) collect(ctx context.Context, grace time.Duration, now time.Time) ([]string, error) {
	live := map[string]bool{}
	roots, err := os.ReadDir(s.rootsDir())
	if err != nil {
		return nil, err
	}
	for _, r := range roots {
		b, err := os.ReadFile(filepath.Join(s.rootsDir(), r.Name()))
		if err != nil {
			return nil, err
		}
		paths, err := s.Requisites(ctx, string(b))
		if err != nil {
			// A root whose closure is incomplete keeps what it can reach; never guess the rest away.
			return nil, fmt.Errorf("root %s: %w", r.Name(), err)
		}
		for _, p := range paths {
			live[p] = true
		}
	}
	entries, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, err
	}
	var removed []string
	for _, e := range entries {
		base := e.Name()
		if strings.HasPrefix(base, ".") {
			continue
		}
		p := StoreDir + "/" + base
		mfi, err := os.Stat(s.metaPath(base))
		switch {
		case errors.Is(err, os.ErrNotExist):
		case err != nil:
			return removed, err
		case live[p] || now.Sub(mfi.ModTime()) < grace:
			continue
		}
		// Metadata goes first: a path is invalid from that moment on.
		if err := os.Remove(s.metaPath(base)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return removed, err
		}
		if err := os.RemoveAll(filepath.Join(s.dir, base)); err != nil {
			return removed, err
		}
		removed = append(removed, p)
	}
	metas, err := os.ReadDir(s.metaDir())
	if err != nil {
		return removed, err
	}
	for _, m := range metas {
		base := strings.TrimSuffix(m.Name(), ".json")
		if _, err := os.Lstat(filepath.Join(s.dir, base)); errors.Is(err, os.ErrNotExist) {
			_ = os.Remove(filepath.Join(s.metaDir(), m.Name()))
		}
	}
	return removed, nil
}

func checkRootName(name string) error {
	if name == "" || strings.ContainsAny(name, "/\x00") || strings.HasPrefix(name, ".") {
		return fmt.Errorf("GC root name %q must be a plain file name", name)
	}
	return nil
}

func writeFileAtomic(path string, b []byte) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return err
	}
	return nil
}

func syncfs(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	return unix.Syncfs(int(f.Fd()))
}

var _ Store = (*OwnStore)(nil)
