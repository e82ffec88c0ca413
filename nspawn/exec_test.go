// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package nspawn

import (
	"bytes"
	"debug/elf"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/shoenig/test/must"
	"golang.org/x/sys/unix"
)

// guestRoot lays out a NixOS-like root: PATH entries that are absolute symlinks into the store,
// which only resolve inside the root.
func guestRoot(t *testing.T) int {
	t.Helper()
	root := t.TempDir()
	for _, d := range []string{"nix/store/abc-tools/bin/dir", "run/current-system", "usr/bin", "etc"} {
		must.NoError(t, os.MkdirAll(filepath.Join(root, d), 0o755))
	}
	files := map[string]os.FileMode{
		"nix/store/abc-tools/bin/tool": 0o755,
		"nix/store/abc-tools/bin/data": 0o644,
		"usr/bin/data":                 0o644,
		"usr/bin/fhs":                  0o700,
		"etc/passwd":                   0o644,
		"usr/bin/script":               0o755,
		"usr/bin/bash-script":          0o755,
		"usr/bin/nested":               0o755,
	}
	contents := map[string]string{
		"usr/bin/script":      "#!/run/current-system/sw/bin/tool -x\n",
		"usr/bin/bash-script": "#! /bin/bash\necho hi\n",
		"usr/bin/nested":      "#!/usr/bin/bash-script\n",
	}
	for f, mode := range files {
		must.NoError(t, os.WriteFile(filepath.Join(root, f), []byte(contents[f]), mode))
	}
	// A dynamically linked ELF file whose loader is not in the root, and the same file with a
	// loader path of the same length that is.
	elfFile, loader := dynamicELF(t)
	inRoot := "/x/" + strings.Repeat("l", len(loader)-3)
	must.NoError(t, os.MkdirAll(filepath.Join(root, "x"), 0o755))
	must.NoError(t, os.WriteFile(filepath.Join(root, inRoot), nil, 0o755))
	withLoader := bytes.Replace(elfFile, []byte(loader+"\x00"), []byte(inRoot+"\x00"), 1)
	must.False(t, bytes.Equal(elfFile, withLoader))
	must.NoError(t, os.WriteFile(filepath.Join(root, "usr/bin/nixelf"), withLoader, 0o755))
	must.NoError(t, os.WriteFile(filepath.Join(root, "usr/bin/foreignelf"), elfFile, 0o755))
	links := map[string]string{
		"run/current-system/sw": "/nix/store/abc-tools",
		"bin":                   "/usr/bin",
		// Climbing out of the root stops at it, as in the machine.
		"usr/bin/escape": "../../../../../../../../bin/sh",
	}
	for l, target := range links {
		must.NoError(t, os.Symlink(target, filepath.Join(root, l)))
	}
	fd, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	must.NoError(t, err)
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

// dynamicELF is a host binary with an ELF loader, and the loader's path.
func dynamicELF(t *testing.T) ([]byte, string) {
	t.Helper()
	f, err := elf.Open("/bin/true")
	must.NoError(t, err)
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			b, err := io.ReadAll(p.Open())
			must.NoError(t, err)
			content, err := os.ReadFile("/bin/true")
			must.NoError(t, err)
			return content, string(bytes.TrimRight(b, "\x00"))
		}
	}
	t.Fatal("/bin/true has no ELF loader")
	return nil, ""
}

func TestFindCommand(t *testing.T) {
	root := guestRoot(t)
	for _, tc := range []struct {
		name, want string
	}{
		{"tool", "/run/current-system/sw/bin/tool"},
		{"/run/current-system/sw/bin/tool", "/run/current-system/sw/bin/tool"},
		{"fhs", "/usr/bin/fhs"},
		{"/bin/fhs", "/bin/fhs"},
		// Relative to /, the exec's working directory.
		{"bin/fhs", "/bin/fhs"},
		{"./usr/../bin/fhs", "/bin/fhs"},
		{"script", "/usr/bin/script"},
		{"nixelf", "/usr/bin/nixelf"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := findCommand(root, tc.name)
			must.NoError(t, err)
			must.Eq(t, tc.want, got)
		})
	}
}

func TestFindCommandFailures(t *testing.T) {
	root := guestRoot(t)
	for _, tc := range []struct {
		name string
		code int
		msg  string
	}{
		{"/no/such/cmd", ExitNotFound, "exec: /no/such/cmd: no such file or directory"},
		{"no-such-cmd", ExitNotFound, "exec: no-such-cmd: executable file not found in PATH (" + guestPath + ")"},
		{"escape", ExitNotFound, "exec: escape: executable file not found in PATH"},
		{"/etc/passwd", ExitNotExecutable, "exec: /etc/passwd: permission denied"},
		// The first match that cannot be executed, when no later one can.
		{"data", ExitNotExecutable, "exec: data: /run/current-system/sw/bin/data: permission denied"},
		{"/etc", ExitNotExecutable, "exec: /etc: is a directory"},
		{"dir", ExitNotExecutable, "exec: dir: /run/current-system/sw/bin/dir: is a directory"},
		{"/etc/passwd/x", ExitNotExecutable, "exec: /etc/passwd/x: not a directory"},
		{"", ExitNotFound, "exec: the command name is empty"},
		{"bash-script", ExitNotExecutable, "exec: bash-script: bad interpreter /bin/bash: no such file or directory"},
		{"/usr/bin/nested", ExitNotExecutable, "exec: /usr/bin/nested: bad interpreter /bin/bash: no such file or directory"},
		{"foreignelf", ExitNotExecutable, "exec: foreignelf: ELF loader /lib"},
		{"/x", ExitNotExecutable, "exec: /x: is a directory"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := findCommand(root, tc.name)
			var ce *commandError
			must.True(t, errors.As(err, &ce), must.Sprintf("%v", err))
			must.Eq(t, tc.code, ce.code)
			must.StrContains(t, ce.msg, tc.msg)
			var out bytes.Buffer
			code, err := reportCommandError(&out, err)
			must.NoError(t, err)
			must.Eq(t, tc.code, code)
			must.Eq(t, ce.msg+"\n", out.String())
		})
	}
}

func TestRunsSystemd(t *testing.T) {
	root := guestRoot(t)
	must.False(t, runsSystemd(root))
	dir := t.TempDir()
	must.NoError(t, os.MkdirAll(filepath.Join(dir, "run/systemd/system"), 0o755))
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	must.NoError(t, err)
	defer unix.Close(fd)
	must.True(t, runsSystemd(fd))
}
