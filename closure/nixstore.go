// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package closure

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/nix-community/go-nix/pkg/nar"
	"github.com/nix-community/go-nix/pkg/wire"
	"golang.org/x/sys/unix"
)

// NixStore is the host's Nix store, written through its nix-store program so that Nix knows
// every imported path as valid.
//
// Roots: a named root is a link rootDir/<name> to its toplevel, the driver's own record; what
// Nix sees is one root per closure, a link in its gcroots directory (which Nix documents: a link
// there to a store path is a root), added for the first named root of the closure and removed
// with the last. The driver writes that link itself, under Nix's garbage collector lock, as
// nix-store would: running nix-store took about 50 ms of each start.
type NixStore struct {
	nixStore string
	rootDir  string
	tmp      string
	// closureRoots is the directory in Nix's gcroots that holds the closures' roots, each named
	// rootPrefix plus its toplevel's name; gcLock is Nix's garbage collector lock.
	closureRoots string
	rootPrefix   string
	gcLock       string
	// rootsMu keeps a closure's root from being dropped while another name is rooted on it.
	rootsMu sync.Mutex
}

// nixStateDir is where Nix keeps its GC roots and its garbage collector lock.
const nixStateDir = "/nix/var/nix"

// legacyClosureRoots held the closures' roots of plugins before 2026-12, which nix-store
// registered as indirect roots.
const legacyClosureRoots = ".closures"

// NewNixStore uses the nix-store program at nixStore; roots go to rootDir and staging to tmp.
func NewNixStore(nixStore, rootDir, tmp string) (*NixStore, error) {
	return newNixStore(nixStore, rootDir, tmp, nixStateDir)
}

func newNixStore(nixStore, rootDir, tmp, stateDir string) (*NixStore, error) {
	abs, err := filepath.Abs(rootDir)
	if err != nil {
		return nil, err
	}
	// The data directory's own prefix: plugins with data directories of their own share a host.
	sum := sha256.Sum256([]byte(abs))
	s := &NixStore{
		nixStore: nixStore, rootDir: abs, tmp: tmp,
		closureRoots: filepath.Join(stateDir, "gcroots", "nomad-driver-nixos"),
		rootPrefix:   hex.EncodeToString(sum[:6]) + "-",
		gcLock:       filepath.Join(stateDir, "gc.lock"),
	}
	for _, d := range []string{abs, s.closureRoots} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, err
		}
	}
	if err := clearTemp(s); err != nil {
		return nil, err
	}
	if err := s.takeOverLegacyClosureRoots(); err != nil {
		return nil, fmt.Errorf("taking over the closure roots in %s: %w", filepath.Join(abs, legacyClosureRoots), err)
	}
	// A plugin that died between adding a closure's root and naming it leaves the closure's
	// root alone.
	if err := s.dropUnnamedClosureRoots(); err != nil {
		return nil, err
	}
	return s, nil
}

// HostNixUsable says whether the host's Nix store can take imports: nix-store runs and the store
// and its database are writable.
func HostNixUsable(nixStore string) bool {
	if _, err := NixVersion(nixStore); err != nil {
		return false
	}
	for _, d := range []string{StoreDir, "/nix/var/nix/db"} {
		if unix.Access(d, unix.W_OK) != nil {
			return false
		}
	}
	return true
}

// NixVersion is what `nix-store --version` says, such as "2.8.0".
func NixVersion(nixStore string) (string, error) {
	out, err := exec.Command(nixStore, "--version").Output()
	if err != nil {
		return "", err
	}
	f := strings.Fields(string(out))
	if len(f) == 0 {
		return "", errors.New("nix-store --version printed nothing")
	}
	return f[len(f)-1], nil
}

func (s *NixStore) Kind() string    { return KindHost }
func (s *NixStore) Dir() string     { return StoreDir }
func (s *NixStore) tempDir() string { return s.tmp }

func (s *NixStore) run(ctx context.Context, stdin io.Reader, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, s.nixStore, args...)
	cmd.Stdin = stdin
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(stderr.String())
		if i := strings.LastIndex(msg, "\n"); i >= 0 {
			msg = msg[i+1:]
		}
		return "", fmt.Errorf("nix-store %s: %w: %s", args[0], err, msg)
	}
	return stdout.String(), nil
}

// maxArgs keeps command lines well below the kernel's limit.
const maxArgs = 1000

func (s *NixStore) Missing(ctx context.Context, paths []string) (map[string]bool, error) {
	out := map[string]bool{}
	for len(paths) > 0 {
		n := min(len(paths), maxArgs)
		res, err := s.run(ctx, nil, append([]string{"--check-validity", "--print-invalid"}, paths[:n]...)...)
		if err != nil {
			return nil, err
		}
		for _, l := range strings.Fields(res) {
			out[l] = true
		}
		paths = paths[n:]
	}
	return out, nil
}

func (s *NixStore) Requisites(ctx context.Context, p string) ([]string, error) {
	res, err := s.run(ctx, nil, "--query", "--requisites", p)
	if err != nil {
		return nil, err
	}
	paths := strings.Fields(res)
	sort.Strings(paths)
	return paths, nil
}

// Realise makes p valid through the host's own substituters and builders.
func (s *NixStore) Realise(ctx context.Context, p string) error {
	_, err := s.run(ctx, nil, "--realise", p)
	return err
}

func (s *NixStore) AddRoot(ctx context.Context, name, p string) error {
	if err := checkRootName(name); err != nil {
		return err
	}
	s.rootsMu.Lock()
	defer s.rootsMu.Unlock()
	if err := s.rootClosure(ctx, p); err != nil {
		return err
	}
	link := filepath.Join(s.rootDir, name)
	if err := os.Remove(link); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if err := os.Symlink(p, link); err != nil {
		return errors.Join(err, s.dropClosureRootIfUnnamed(p))
	}
	return nil
}

func (s *NixStore) RemoveRoot(_ context.Context, name string) error {
	if err := checkRootName(name); err != nil {
		return err
	}
	s.rootsMu.Lock()
	defer s.rootsMu.Unlock()
	link := filepath.Join(s.rootDir, name)
	target, readErr := os.Readlink(link)
	if errors.Is(readErr, os.ErrNotExist) {
		return nil
	}
	if err := os.Remove(link); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if readErr != nil {
		// Not a link: no closure's root depends on it.
		return nil
	}
	return s.dropClosureRootIfUnnamed(target)
}

func (s *NixStore) closureRoot(p string) string {
	return filepath.Join(s.closureRoots, s.rootPrefix+filepath.Base(p))
}

// rootClosure links the closure's root to p unless it is linked. It needs rootsMu held.
//
// It holds Nix's garbage collector lock shared meanwhile, as nix-store does for a root: a
// collection takes it exclusively from finding the roots to the last deletion, so none runs
// while p is checked and linked, and the next one finds the link.
func (s *NixStore) rootClosure(ctx context.Context, p string) error {
	root := s.closureRoot(p)
	if target, err := os.Readlink(root); err == nil && target == p {
		return nil
	}
	unlock, err := lockShared(ctx, s.gcLock)
	if err != nil {
		return err
	}
	defer unlock()
	// A collection since p was found valid deletes a path whole: a toplevel on disk has its
	// closure.
	if _, err := os.Lstat(p); err != nil {
		return fmt.Errorf("%s left the store (collected as garbage?): %w", p, err)
	}
	return s.linkClosureRoot(p)
}

func (s *NixStore) linkClosureRoot(p string) error {
	root := s.closureRoot(p)
	if err := os.Remove(root); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return os.Symlink(p, root)
}

// lockShared takes a shared flock of the file at path, as Nix locks its files, waiting while
// an exclusive one is held.
func lockShared(ctx context.Context, path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_SH|unix.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("locking %s: %w", path, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("waiting for Nix's garbage collection to end (%s is locked): %w", path, ctx.Err())
		case <-time.After(gcLockPoll):
		}
	}
}

// gcLockPoll is how often a root waits to see whether Nix's garbage collection ended.
const gcLockPoll = 100 * time.Millisecond

// named is the set of toplevels that named roots link to. It needs rootsMu held, or the store
// to itself (NewNixStore).
func (s *NixStore) named() (map[string]bool, error) {
	entries, err := os.ReadDir(s.rootDir)
	if err != nil {
		return nil, err
	}
	out := map[string]bool{}
	for _, e := range entries {
		if target, err := os.Readlink(filepath.Join(s.rootDir, e.Name())); err == nil {
			out[target] = true
		}
	}
	return out, nil
}

// dropClosureRootIfUnnamed removes the closure's root once no named root links to the closure.
// It needs rootsMu held.
func (s *NixStore) dropClosureRootIfUnnamed(p string) error {
	named, err := s.named()
	if err != nil || named[p] {
		return err
	}
	if err := os.Remove(s.closureRoot(p)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

func (s *NixStore) dropUnnamedClosureRoots() error {
	named, err := s.named()
	if err != nil {
		return err
	}
	entries, err := os.ReadDir(s.closureRoots)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), s.rootPrefix) {
			continue
		}
		root := filepath.Join(s.closureRoots, e.Name())
		if target, err := os.Readlink(root); err == nil && named[target] {
			continue
		}
		if err := os.Remove(root); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	return nil
}

// takeOverLegacyClosureRoots roots the closures an older plugin rooted, in Nix's gcroots, and
// removes the old roots; Nix drops its indirect links to them at its next collection.
func (s *NixStore) takeOverLegacyClosureRoots() error {
	dir := filepath.Join(s.rootDir, legacyClosureRoots)
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	named, err := s.named()
	if err != nil {
		return err
	}
	for _, e := range entries {
		old := filepath.Join(dir, e.Name())
		// The old root holds the closure until the new one is there: no lock is needed, and
		// a start-up never waits for Nix's garbage collection.
		if target, err := os.Readlink(old); err == nil && named[target] {
			if err := s.linkClosureRoot(target); err != nil {
				return err
			}
		}
		if err := os.Remove(old); err != nil {
			return err
		}
	}
	return os.Remove(dir)
}

// stage spools the verified NAR to a file; commit feeds it to nix-store --import.
func (s *NixStore) stage(tmp string, info *PathInfo) (stager, error) {
	base, err := ParsePath(info.Path)
	if err != nil {
		return nil, err
	}
	f, err := os.OpenFile(filepath.Join(tmp, base+".nar"), os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, err
	}
	return &spool{f: f, w: bufio.NewWriterSize(f, 256<<10)}, nil
}

type spool struct {
	f *os.File
	w *bufio.Writer
}

func (sp *spool) raw() io.Writer                     { return sp.w }
func (sp *spool) entry(*nar.Header, io.Reader) error { return nil }

func (sp *spool) finish() error {
	if err := sp.w.Flush(); err != nil {
		sp.f.Close()
		return err
	}
	return sp.f.Close()
}

func (sp *spool) discard() error {
	if err := sp.f.Truncate(0); err != nil {
		return err
	}
	if _, err := sp.f.Seek(0, io.SeekStart); err != nil {
		return err
	}
	sp.w.Reset(sp.f)
	return nil
}

// commit writes the spooled NARs as one export stream into nix-store --import, references first.
func (s *NixStore) commit(ctx context.Context, tmp string, infos []*PathInfo) error {
	if len(infos) == 0 {
		return nil
	}
	pr, pw := io.Pipe()
	go func() {
		pw.CloseWithError(writeExport(pw, tmp, infos))
	}()
	_, err := s.run(ctx, pr, "--import")
	pr.Close()
	return err
}

func writeExport(w io.Writer, tmp string, infos []*PathInfo) error {
	bw := bufio.NewWriterSize(w, 256<<10)
	for _, info := range infos {
		base, _ := ParsePath(info.Path)
		if err := wire.WriteUint64(bw, 1); err != nil {
			return err
		}
		f, err := os.Open(filepath.Join(tmp, base+".nar"))
		if err != nil {
			return err
		}
		_, err = io.Copy(bw, f)
		f.Close()
		if err != nil {
			return err
		}
		if err := wire.WriteUint64(bw, exportMagic); err != nil {
			return err
		}
		if err := wire.WriteString(bw, info.Path); err != nil {
			return err
		}
		if err := wire.WriteUint64(bw, uint64(len(info.References))); err != nil {
			return err
		}
		for _, r := range info.References {
			if err := wire.WriteString(bw, r); err != nil {
				return err
			}
		}
		// No deriver, no legacy signature.
		if err := wire.WriteString(bw, ""); err != nil {
			return err
		}
		if err := wire.WriteUint64(bw, 0); err != nil {
			return err
		}
	}
	if err := wire.WriteUint64(bw, 0); err != nil {
		return err
	}
	return bw.Flush()
}

var _ Store = (*NixStore)(nil)
