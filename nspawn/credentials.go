// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package nspawn

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// CredentialSizeMax is the most systemd takes for one credential (CREDENTIAL_SIZE_MAX).
const CredentialSizeMax = 1 << 20

// Credential is a file the machine's systemd gets as a system credential: nspawn reads it with
// --load-credential and hands it to the guest's PID 1, whose services take it with
// LoadCredential=NAME.
type Credential struct {
	Name string
	// Path is the staged copy nspawn reads (StageCredentials), never a path the guest can change.
	Path string
}

// ValidCredentialName says whether systemd takes name as a credential ID: a file name of
// printable ASCII without ':' (nspawn's separator), at most 255 bytes.
func ValidCredentialName(name string) bool {
	if name == "" || name == "." || name == ".." || len(name) > 255 {
		return false
	}
	for _, r := range name {
		if r <= ' ' || r > '~' || r == '/' || r == ':' {
			return false
		}
	}
	return true
}

// CredentialSource names a credential and the file, relative to Dir, it is made from.
type CredentialSource struct {
	Name string
	File string
}

// StageCredentials copies each source file, read inside dir without following links out of it,
// into stage (made with mode 0700, files 0400): the guest can write to dir (it is the task's
// secrets directory), so nspawn must not read there itself, where a link put in by the guest
// would make it read any host file at the machine's next boot. stage should be on a tmpfs, as
// the secrets directory is. A failure removes stage again.
func StageCredentials(dir, stage string, sources []CredentialSource) (_ []Credential, err error) {
	if len(sources) == 0 {
		return nil, nil
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		return nil, err
	}
	defer root.Close()
	if err := os.MkdirAll(filepath.Dir(stage), 0o700); err != nil {
		return nil, err
	}
	if err := os.Mkdir(stage, 0o700); err != nil {
		return nil, fmt.Errorf("creating the credential staging directory: %w", err)
	}
	defer func() {
		if err != nil {
			_ = os.RemoveAll(stage)
		}
	}()
	out := make([]Credential, 0, len(sources))
	for _, s := range sources {
		if !ValidCredentialName(s.Name) {
			return nil, fmt.Errorf("credential name %q: must be a file name of printable ASCII characters without '/' or ':', at most 255 bytes", s.Name)
		}
		dst := filepath.Join(stage, s.Name)
		if err := copyCredential(root, s.File, dst); err != nil {
			return nil, fmt.Errorf("credential %q from %q: %w", s.Name, s.File, err)
		}
		out = append(out, Credential{Name: s.Name, Path: dst})
	}
	return out, nil
}

func copyCredential(root *os.Root, rel, dst string) error {
	if rel == "" || !filepath.IsLocal(rel) {
		return errors.New("must be a path inside the directory, without '..'")
	}
	src, err := root.OpenFile(rel, os.O_RDONLY|unix.O_NONBLOCK, 0)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return errors.New("no such file")
		}
		return err
	}
	defer src.Close()
	fi, err := src.Stat()
	if err != nil {
		return err
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("not a regular file (a %s)", strings.TrimSpace(fi.Mode().Type().String()))
	}
	if fi.Size() > CredentialSizeMax {
		return fmt.Errorf("%d bytes, more than systemd's %d for a credential", fi.Size(), CredentialSizeMax)
	}
	f, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o400)
	if err != nil {
		return err
	}
	// One byte more than allowed tells a file that grew since the Stat.
	n, err := io.Copy(f, io.LimitReader(src, CredentialSizeMax+1))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil && n > CredentialSizeMax {
		err = fmt.Errorf("more than systemd's %d bytes for a credential", CredentialSizeMax)
	}
	return err
}
