// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package nspawn

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"golang.org/x/sys/unix"
)

// PrepareRoot creates the fresh, nearly empty root a NixOS container boots from: nspawn refuses a
// root without usr/, and NixOS activation fills in the rest.
func PrepareRoot(root string) (err error) {
	if err := os.MkdirAll(filepath.Dir(root), 0o700); err != nil {
		return err
	}
	if err := os.Mkdir(root, 0o755); err != nil {
		return fmt.Errorf("creating machine root: %w", err)
	}
	defer func() {
		if err != nil {
			_ = RemoveRoot(root)
		}
	}()
	for _, d := range []struct {
		path string
		mode fs.FileMode
	}{
		{"usr", 0o755}, {"etc", 0o755}, {"var", 0o755}, {"var/lib", 0o755},
		{"var/lib/private", 0o700}, {"root", 0o700}, {"nix", 0o755}, {"nix/var", 0o755},
		{"nix/var/nix", 0o755},
		// The machine's /tmp is this directory, not a tmpfs of nspawn's: see UnitProperties.
		{"tmp", 0o777 | fs.ModeSticky},
	} {
		if err := os.Mkdir(filepath.Join(root, d.path), d.mode); err != nil {
			return err
		}
		// Mkdir applies the umask; the guest expects these exact modes.
		if err := os.Chmod(filepath.Join(root, d.path), d.mode); err != nil {
			return err
		}
	}
	// Empty files: systemd then uses the --uuid as machine ID, and os-release exists as nspawn wants.
	for _, f := range []string{"etc/os-release", "etc/machine-id"} {
		if err := os.WriteFile(filepath.Join(root, f), nil, 0o644); err != nil {
			return err
		}
	}
	return nil
}

// RemoveRoot deletes a machine root and everything below it. It unmounts what is mounted there
// first (RemoveAll would otherwise delete through a mount) and clears the immutable flag NixOS
// activation sets on var/empty. A missing root is no error.
func RemoveRoot(root string) error {
	if _, err := os.Lstat(root); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	mounts, err := mountsBelow(root)
	if err != nil {
		return err
	}
	for _, mp := range mounts {
		if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
			return fmt.Errorf("unmounting %s: %w", mp, err)
		}
	}
	if err := clearImmutable(root, "var/empty"); err != nil {
		return err
	}
	if err := os.RemoveAll(root); err != nil {
		return fmt.Errorf("removing machine root: %w", err)
	}
	return nil
}

// Inode flags of FS_IOC_GETFLAGS (linux/fs.h), which x/sys/unix does not name.
const (
	fsImmutableFL = 0x10
	fsAppendFL    = 0x20
)

// clearImmutable opens rel inside root without leaving it (the guest controls its symlinks) and
// drops the immutable and append-only flags.
func clearImmutable(root, rel string) error {
	r, err := os.OpenRoot(root)
	if err != nil {
		return err
	}
	defer r.Close()
	fi, err := r.Lstat(rel)
	if err != nil || !fi.IsDir() {
		return nil
	}
	f, err := r.Open(rel)
	if err != nil {
		return nil
	}
	defer f.Close()
	flags, err := unix.IoctlGetUint32(int(f.Fd()), unix.FS_IOC_GETFLAGS)
	if err != nil {
		return nil // the filesystem has no such flags
	}
	const sticky = fsImmutableFL | fsAppendFL
	if flags&sticky == 0 {
		return nil
	}
	if err := unix.IoctlSetPointerInt(int(f.Fd()), unix.FS_IOC_SETFLAGS, int(flags&^sticky)); err != nil {
		return fmt.Errorf("clearing immutable flag of %s: %w", filepath.Join(root, rel), err)
	}
	return nil
}

// mountsBelow lists the mount points at or below dir, deepest first.
func mountsBelow(dir string) ([]string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		mp := unescapeMountPath(fields[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			out = append(out, mp)
		}
	}
	sort.Slice(out, func(i, j int) bool { return len(out[i]) > len(out[j]) })
	return out, sc.Err()
}

// unescapeMountPath undoes mountinfo's octal escapes (\040 for a space).
func unescapeMountPath(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var v byte
			if _, err := fmt.Sscanf(s[i+1:i+4], "%3o", &v); err == nil {
				b.WriteByte(v)
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// PrepareStoreView creates the view directory of a closure view: an empty mount point for each
// path (a directory or a file, as the path is) and the symlink paths themselves. Mount points
// made here rather than by nspawn let /nix/store stay read-only in the machine.
func PrepareStoreView(v StoreView) error {
	if v.Paths == nil {
		return nil
	}
	if err := os.Mkdir(v.View, 0o755); err != nil {
		return fmt.Errorf("creating the store view: %w", err)
	}
	for _, p := range v.Paths {
		dst := filepath.Join(v.View, p)
		if target, ok := v.Links[p]; ok {
			if err := os.Symlink(target, dst); err != nil {
				return err
			}
			continue
		}
		fi, err := os.Stat(filepath.Join(v.Dir, p))
		if err != nil {
			return err
		}
		if fi.IsDir() {
			err = os.Mkdir(dst, 0o555)
		} else {
			err = os.WriteFile(dst, nil, 0o444)
		}
		if err != nil {
			return err
		}
	}
	return os.Chmod(v.View, 0o555)
}
