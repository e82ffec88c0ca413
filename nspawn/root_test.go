// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package nspawn

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/shoenig/test/must"
	"golang.org/x/sys/unix"
)

func TestPrepareRoot(t *testing.T) {
	// The modes must not depend on the umask of the Nomad agent.
	old := syscall.Umask(0o077)
	defer syscall.Umask(old)

	root := filepath.Join(t.TempDir(), "machines", "nomad-3f2504e0-web", "root")
	must.NoError(t, PrepareRoot(root))

	dirs := map[string]os.FileMode{
		"usr":             0o755,
		"etc":             0o755,
		"var":             0o755,
		"var/lib":         0o755,
		"var/lib/private": 0o700,
		"root":            0o700,
		"nix":             0o755,
		"nix/var":         0o755,
		"nix/var/nix":     0o755,
	}
	fi, err := os.Lstat(filepath.Join(root, "tmp"))
	must.NoError(t, err)
	must.EqOp(t, 0o777|fs.ModeSticky|fs.ModeDir, fi.Mode())
	for rel, mode := range dirs {
		fi, err := os.Lstat(filepath.Join(root, rel))
		must.NoError(t, err)
		must.True(t, fi.IsDir(), must.Sprint(rel))
		must.EqOp(t, mode, fi.Mode().Perm(), must.Sprint(rel))
	}
	for _, rel := range []string{"etc/os-release", "etc/machine-id"} {
		fi, err := os.Lstat(filepath.Join(root, rel))
		must.NoError(t, err)
		must.True(t, fi.Mode().IsRegular(), must.Sprint(rel))
		// Empty: systemd then takes the machine ID from --uuid.
		must.EqOp(t, int64(0), fi.Size(), must.Sprint(rel))
	}
	// Nothing else: NixOS activation fills in the rest.
	var found []string
	must.NoError(t, filepath.WalkDir(root, func(p string, _ os.DirEntry, err error) error {
		if p != root {
			rel, _ := filepath.Rel(root, p)
			found = append(found, rel)
		}
		return err
	}))
	must.EqOp(t, len(dirs)+3, len(found), must.Sprintf("found %v", found))
}

func TestPrepareRoot_ExistingRootIsLeftAlone(t *testing.T) {
	root := filepath.Join(t.TempDir(), "root")
	must.NoError(t, os.MkdirAll(filepath.Join(root, "var", "lib", "data"), 0o755))
	keep := filepath.Join(root, "var", "lib", "data", "keep")
	must.NoError(t, os.WriteFile(keep, []byte("x"), 0o644))

	must.Error(t, PrepareRoot(root))
	// The failed call must not clean up a root it did not create.
	_, err := os.Stat(keep)
	must.NoError(t, err)
}

func TestRemoveRoot(t *testing.T) {
	root := filepath.Join(t.TempDir(), "root")
	must.NoError(t, PrepareRoot(root))
	must.NoError(t, os.WriteFile(filepath.Join(root, "etc", "hostname"), []byte("web\n"), 0o644))
	// A directory its owner cannot write into, as the guest may leave behind.
	must.NoError(t, os.MkdirAll(filepath.Join(root, "var", "empty"), 0o555))

	must.NoError(t, RemoveRoot(root))
	_, err := os.Lstat(root)
	must.True(t, errors.Is(err, os.ErrNotExist), must.Sprintf("err = %v", err))

	// Removing it again, or a root that never existed, is no error.
	must.NoError(t, RemoveRoot(root))
	must.NoError(t, RemoveRoot(filepath.Join(t.TempDir(), "never")))
}

// The guest owns its root and may plant symlinks; removing the root must not follow them.
func TestRemoveRoot_DoesNotFollowSymlinks(t *testing.T) {
	cases := []struct {
		name  string
		plant func(t *testing.T, root, outside string)
	}{
		{"var/empty is a symlink", func(t *testing.T, root, outside string) {
			must.NoError(t, os.Symlink(outside, filepath.Join(root, "var", "empty")))
		}},
		{"var is a symlink", func(t *testing.T, root, outside string) {
			must.NoError(t, os.MkdirAll(filepath.Join(outside, "empty"), 0o755))
			must.NoError(t, os.WriteFile(filepath.Join(outside, "empty", "keep"), []byte("x"), 0o644))
			must.NoError(t, os.RemoveAll(filepath.Join(root, "var")))
			must.NoError(t, os.Symlink(outside, filepath.Join(root, "var")))
		}},
		{"absolute symlink to the outside's parent", func(t *testing.T, root, outside string) {
			must.NoError(t, os.Symlink(filepath.Dir(outside), filepath.Join(root, "etc", "up")))
		}},
		{"relative symlink leaving the root", func(t *testing.T, root, outside string) {
			rel, err := filepath.Rel(filepath.Join(root, "nix"), outside)
			must.NoError(t, err)
			must.NoError(t, os.Symlink(rel, filepath.Join(root, "nix", "store")))
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			base := t.TempDir()
			outside := filepath.Join(base, "outside")
			must.NoError(t, os.Mkdir(outside, 0o755))
			file := filepath.Join(outside, "precious")
			must.NoError(t, os.WriteFile(file, []byte("host data"), 0o644))
			root := filepath.Join(base, "machine", "root")
			must.NoError(t, PrepareRoot(root))
			c.plant(t, root, outside)

			must.NoError(t, RemoveRoot(root))

			_, err := os.Lstat(root)
			must.True(t, errors.Is(err, os.ErrNotExist))
			b, err := os.ReadFile(file)
			must.NoError(t, err)
			must.EqOp(t, "host data", string(b))
			entries, err := os.ReadDir(outside)
			must.NoError(t, err)
			must.SliceNotEmpty(t, entries)
		})
	}
}

// NixOS activation makes var/empty immutable; RemoveRoot clears the flag. Setting it needs
// CAP_LINUX_IMMUTABLE and a file system with inode flags, so the test skips without them.
func TestRemoveRoot_ImmutableVarEmpty(t *testing.T) {
	root := filepath.Join(t.TempDir(), "root")
	must.NoError(t, PrepareRoot(root))
	empty := filepath.Join(root, "var", "empty")
	must.NoError(t, os.Mkdir(empty, 0o555))
	f, err := os.Open(empty)
	must.NoError(t, err)
	flags, err := unix.IoctlGetUint32(int(f.Fd()), unix.FS_IOC_GETFLAGS)
	if err == nil {
		err = unix.IoctlSetPointerInt(int(f.Fd()), unix.FS_IOC_SETFLAGS, int(flags|fsImmutableFL))
	}
	f.Close()
	if err != nil {
		t.Skipf("cannot make a directory immutable here: %v", err)
	}
	t.Cleanup(func() { _ = clearImmutable(root, "var/empty") })
	// It really is immutable: a plain removal fails.
	must.Error(t, os.Remove(empty))

	must.NoError(t, RemoveRoot(root))
	_, err = os.Lstat(root)
	must.True(t, errors.Is(err, os.ErrNotExist))
}

func TestUnescapeMountPath(t *testing.T) {
	cases := map[string]string{
		"/plain":            "/plain",
		`/a\040b`:           "/a b",
		`/tab\011x`:         "/tab\tx",
		`/nl\012x`:          "/nl\nx",
		`/back\134slash`:    `/back\slash`,
		`/end\040`:          "/end ",
		`/two\040\040`:      "/two  ",
		`/short\04`:         `/short\04`,
		`/not\oct`:          `/not\oct`,
		"/ü\\040ß":          "/ü ß",
		`/var/lib/x\040y/z`: "/var/lib/x y/z",
	}
	for in, want := range cases {
		must.EqOp(t, want, unescapeMountPath(in), must.Sprintf("unescapeMountPath(%q)", in))
	}
}

func TestMountsBelow(t *testing.T) {
	if _, err := os.Stat("/proc/self/mountinfo"); err != nil {
		t.Skip("no /proc/self/mountinfo")
	}
	// A fresh directory has no mounts below it.
	mounts, err := mountsBelow(t.TempDir())
	must.NoError(t, err)
	must.SliceEmpty(t, mounts)

	// A path prefix is not a parent directory: /pro holds nothing of /proc.
	mounts, err = mountsBelow("/pro")
	must.NoError(t, err)
	must.SliceEmpty(t, mounts)

	// Deepest first, so a nested mount is unmounted before its parent.
	mounts, err = mountsBelow("/proc")
	must.NoError(t, err)
	if len(mounts) == 0 {
		t.Skip("/proc is no mount point here")
	}
	must.SliceContainsOp(t, mounts, "/proc")
	must.EqOp(t, "/proc", mounts[len(mounts)-1])
	for i, m := range mounts {
		must.True(t, m == "/proc" || len(m) > len("/proc/") && m[:len("/proc/")] == "/proc/", must.Sprint(m))
		if i > 0 {
			must.LessEq(t, len(mounts[i-1]), len(m))
		}
	}
}

func TestPrepareStoreView(t *testing.T) {
	store := t.TempDir()
	must.NoError(t, os.Mkdir(filepath.Join(store, "a-dir"), 0o555))
	must.NoError(t, os.WriteFile(filepath.Join(store, "b-file"), []byte("x"), 0o444))
	v := StoreView{
		Dir:   store,
		Paths: []string{"a-dir", "b-file", "c-link"},
		Links: map[string]string{"c-link": "/nix/store/a-dir/bin"},
		View:  filepath.Join(t.TempDir(), "view"),
	}
	must.NoError(t, PrepareStoreView(v))
	fi, err := os.Lstat(filepath.Join(v.View, "a-dir"))
	must.NoError(t, err)
	must.True(t, fi.IsDir())
	fi, err = os.Lstat(filepath.Join(v.View, "b-file"))
	must.NoError(t, err)
	must.True(t, fi.Mode().IsRegular())
	must.EqOp(t, int64(0), fi.Size())
	target, err := os.Readlink(filepath.Join(v.View, "c-link"))
	must.NoError(t, err)
	must.Eq(t, "/nix/store/a-dir/bin", target)
	entries, err := os.ReadDir(v.View)
	must.NoError(t, err)
	must.Len(t, 3, entries)

	// The host view needs no view directory.
	must.NoError(t, PrepareStoreView(StoreView{Dir: store, View: filepath.Join(t.TempDir(), "none")}))
}
