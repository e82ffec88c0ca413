// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package nspawn

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/shoenig/test/must"
)

func TestStageCredentials(t *testing.T) {
	secrets := t.TempDir()
	must.NoError(t, os.WriteFile(filepath.Join(secrets, "db-password"), []byte("hunter2\n"), 0o600))
	must.NoError(t, os.Mkdir(filepath.Join(secrets, "tls"), 0o755))
	must.NoError(t, os.WriteFile(filepath.Join(secrets, "tls", "key.pem"), []byte("KEY"), 0o644))
	// A link that stays inside the directory is read; one out of it is not.
	must.NoError(t, os.Symlink("tls/key.pem", filepath.Join(secrets, "inside")))
	outside := filepath.Join(t.TempDir(), "host-secret")
	must.NoError(t, os.WriteFile(outside, []byte("host only"), 0o600))
	must.NoError(t, os.Symlink(outside, filepath.Join(secrets, "escape")))
	must.NoError(t, os.Symlink("../"+filepath.Base(filepath.Dir(outside))+"/host-secret", filepath.Join(secrets, "escape-relative")))
	must.NoError(t, syscall.Mkfifo(filepath.Join(secrets, "fifo"), 0o600))
	must.NoError(t, os.WriteFile(filepath.Join(secrets, "big"), make([]byte, CredentialSizeMax+1), 0o600))

	stage := filepath.Join(t.TempDir(), "run", "m1")
	creds, err := StageCredentials(secrets, stage, []CredentialSource{
		{Name: "db-password", File: "db-password"}, {Name: "tls.key", File: "tls/key.pem"}, {Name: "linked", File: "inside"},
	})
	must.NoError(t, err)
	must.Eq(t, []Credential{
		{Name: "db-password", Path: filepath.Join(stage, "db-password")},
		{Name: "tls.key", Path: filepath.Join(stage, "tls.key")},
		{Name: "linked", Path: filepath.Join(stage, "linked")},
	}, creds)
	fi, err := os.Stat(stage)
	must.NoError(t, err)
	must.Eq(t, os.FileMode(0o700), fi.Mode().Perm())
	for name, want := range map[string]string{"db-password": "hunter2\n", "tls.key": "KEY", "linked": "KEY"} {
		b, err := os.ReadFile(filepath.Join(stage, name))
		must.NoError(t, err)
		must.Eq(t, want, string(b))
		fi, err := os.Lstat(filepath.Join(stage, name))
		must.NoError(t, err)
		must.Eq(t, os.FileMode(0o400), fi.Mode())
	}

	for _, c := range []struct{ file, want string }{
		{"escape", "escape"},
		{"escape-relative", "escape"},
		{"missing", "no such file"},
		{"fifo", "not a regular file"},
		{"tls", "not a regular file"},
		{"big", "more than systemd's 1048576"},
		{"../x", "inside the directory"},
	} {
		t.Run(c.file, func(t *testing.T) {
			stage := filepath.Join(t.TempDir(), "m2")
			_, err := StageCredentials(secrets, stage, []CredentialSource{{Name: "ok", File: "db-password"}, {Name: "bad", File: c.file}})
			must.ErrorContains(t, err, `credential "bad" from "`+c.file+`"`)
			must.ErrorContains(t, err, c.want)
			must.StrNotContains(t, err.Error(), "host only")
			_, serr := os.Stat(stage)
			must.True(t, os.IsNotExist(serr), must.Sprint("a refused credential leaves the staging directory behind"))
		})
	}
}

func TestValidCredentialName(t *testing.T) {
	for _, ok := range []string{"db-password", "tls.key", "a_b@c", strings.Repeat("x", 255)} {
		must.True(t, ValidCredentialName(ok), must.Sprint(ok))
	}
	for _, bad := range []string{"", ".", "..", "a/b", "a:b", "a b", "é", "a\nb", strings.Repeat("x", 256)} {
		must.False(t, ValidCredentialName(bad), must.Sprint(bad))
	}
}
