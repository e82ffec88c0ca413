// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package closure

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/nix-community/go-nix/pkg/nar"
	"golang.org/x/sys/unix"
)

// nixEpoch is the modification time Nix gives everything in the store.
var nixEpoch = []unix.Timeval{{Sec: 1}, {Sec: 1}}

// walkNAR reads one NAR from r and calls visit for each entry, root first. It refuses what Nix
// would not write and what could escape the path: empty, ".", ".." or duplicate names, and
// entries whose parent is not a directory of the same NAR. go-nix's reader alone lets "..",
// "." and duplicates through.
func walkNAR(r io.Reader, visit func(h *nar.Header, body io.Reader) error) error {
	nr, err := nar.NewReader(noEOF{r})
	if err != nil {
		return fmt.Errorf("not a NAR: %w", err)
	}
	defer nr.Close()
	dirs := map[string]bool{}
	prev := ""
	for first := true; ; first = false {
		h, err := nr.Next()
		if errors.Is(err, io.EOF) {
			if first {
				return errors.New("empty NAR")
			}
			return nil
		}
		if err != nil {
			return fmt.Errorf("malformed NAR: %w", err)
		}
		if err := h.Validate(); err != nil {
			return fmt.Errorf("malformed NAR entry %q: %w", h.Path, err)
		}
		if first != (h.Path == "/") {
			return fmt.Errorf("malformed NAR: unexpected entry %q", h.Path)
		}
		if !first {
			if h.Path == prev {
				return fmt.Errorf("NAR entry %q appears twice", h.Path)
			}
			parent, name := filepath.Split(h.Path)
			if name == "" || name == "." || name == ".." || strings.ContainsRune(name, 0) {
				return fmt.Errorf("NAR entry %q has a name that escapes its store path", h.Path)
			}
			if parent = strings.TrimSuffix(parent, "/"); parent == "" {
				parent = "/"
			}
			if !dirs[parent] {
				return fmt.Errorf("NAR entry %q is not inside a directory of the NAR", h.Path)
			}
		}
		if h.Type == nar.TypeDirectory {
			dirs[h.Path] = true
		}
		prev = h.Path
		if err := visit(h, nr); err != nil {
			return err
		}
	}
}

// noEOF turns the end of the input into an error: a well-formed NAR ends before its input does,
// while go-nix's reader takes an input that ends early for the end of the archive.
type noEOF struct{ r io.Reader }

func (n noEOF) Read(p []byte) (int, error) {
	c, err := n.r.Read(p)
	if errors.Is(err, io.EOF) {
		if c > 0 {
			return c, nil
		}
		return 0, io.ErrUnexpectedEOF
	}
	return c, err
}

// unpacker writes NAR entries below dst, which must not exist yet. Files are created with
// O_EXCL|O_NOFOLLOW and symlinks are written as symlinks, so nothing is ever followed; modes are
// Nix's (0444, 0555, no setuid), and modification times are Nix's epoch.
type unpacker struct {
	dst  string
	dirs []string
}

func (u *unpacker) entry(h *nar.Header, body io.Reader) error {
	p := u.dst
	if h.Path != "/" {
		p = filepath.Join(u.dst, filepath.FromSlash(h.Path))
	}
	switch h.Type {
	case nar.TypeDirectory:
		if err := os.Mkdir(p, 0o555); err != nil {
			return err
		}
		u.dirs = append(u.dirs, p)
	case nar.TypeSymlink:
		if err := os.Symlink(h.LinkTarget, p); err != nil {
			return err
		}
		return unix.Lutimes(p, nixEpoch)
	case nar.TypeRegular:
		mode := os.FileMode(0o444)
		if h.Executable {
			mode = 0o555
		}
		f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_EXCL|unix.O_NOFOLLOW, mode)
		if err != nil {
			return err
		}
		n, err := io.Copy(f, body)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return err
		}
		if n != h.Size {
			return fmt.Errorf("NAR entry %q: %d bytes, header says %d", h.Path, n, h.Size)
		}
		return unix.Lutimes(p, nixEpoch)
	default:
		return fmt.Errorf("NAR entry %q has unsupported type %q", h.Path, h.Type)
	}
	return nil
}

// finish gives directories Nix's modification time, deepest first, since creating an entry
// changes its parent's.
func (u *unpacker) finish() error {
	for i := len(u.dirs) - 1; i >= 0; i-- {
		if err := unix.Lutimes(u.dirs[i], nixEpoch); err != nil {
			return err
		}
	}
	return nil
}

// topInfo is what the toplevel check needs from a NAR: whether it has an executable /init and
// a /kernel.
type topInfo struct {
	dir, init, kernel bool
}

func (t *topInfo) entry(h *nar.Header) {
	switch h.Path {
	case "/":
		t.dir = h.Type == nar.TypeDirectory
	case "/init":
		// NixOS's init is an executable script; a symlink to one is accepted too.
		t.init = h.Type == nar.TypeSymlink || (h.Type == nar.TypeRegular && h.Executable)
	case "/kernel":
		t.kernel = true
	}
}

// check says why the path is not a NixOS system for containers.
func (t *topInfo) check(p string) error {
	switch {
	case !t.dir || !t.init:
		return fmt.Errorf("toplevel %s is not a NixOS system closure: it has no executable init", p)
	case t.kernel:
		return fmt.Errorf("toplevel %s has a kernel, so it is a NixOS system for a VM or bare metal; build it with boot.isNspawnContainer = true", p)
	}
	return nil
}
