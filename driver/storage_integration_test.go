// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

//go:build integration

package driver

import (
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/shoenig/test/must"
	"golang.org/x/sys/unix"
)

// guestExec runs cmd in the machine as a guest service (systemd-run inside it) and returns its
// exit code and output.
func guestExec(t *testing.T, td *testDriver, cfg *drivers.TaskConfig, cmd ...string) (int, string, string) {
	t.Helper()
	res, err := td.ExecTask(cfg.ID, cmd, scaled(time.Minute))
	must.NoError(t, err)
	return res.ExitResult.ExitCode, string(res.Stdout), string(res.Stderr)
}

// A file of the task's secrets directory named in credentials reaches a guest service through
// LoadCredential=, readable by that service's user alone, and lands nowhere else: not in the
// machine's root, the console, the unit or the host's journal. Destroying the task removes the
// staged copy.
func TestCredentials(t *testing.T) {
	td := newTestDriver(t, "")
	const secret = "s3cr3t-credential-value-8d1f"
	since := time.Now()
	cfg := td.newTask(t, "creds", systemdToplevel(t), nil, withConfig(func(tc *TaskConfig) {
		tc.Credentials = []map[string]string{{"db-password": "secrets/db-password", "api.token": "tokens/api"}}
	}))
	secrets := cfg.TaskDir().SecretsDir
	// As a template with perms = "0600" renders it.
	must.NoError(t, os.WriteFile(filepath.Join(secrets, "db-password"), []byte(secret), 0o600))
	must.NoError(t, os.Mkdir(filepath.Join(secrets, "tokens"), 0o700))
	must.NoError(t, os.WriteFile(filepath.Join(secrets, "tokens", "api"), []byte("token-2"), 0o600))
	td.start(t, cfg)
	waitLog(t, cfg, "longrun: started", 2*time.Minute)
	machine := machineOf(t, cfg)

	code, out, errOut := guestExec(t, td, cfg, "systemd-run", "--quiet", "--wait", "--pipe",
		"-p", "LoadCredential=db-password", "-p", "LoadCredential=api.token", "-p", "User=www-data",
		"/bin/sh", "-c", `cd "$CREDENTIALS_DIRECTORY" && stat -c '%n %a %U' db-password api.token && cat db-password && echo && cat api.token`)
	must.Eq(t, 0, code, must.Sprintf("stdout %q, stderr %q", out, errOut))
	must.Eq(t, "db-password 400 www-data\napi.token 400 www-data\n"+secret+"\ntoken-2", out)

	// Another service without LoadCredential= reads it neither from the system credentials nor
	// from /secrets (the template's 0600 file is host root's, nobody's in the machine).
	code, out, errOut = guestExec(t, td, cfg, "systemd-run", "--quiet", "--wait", "--pipe", "-p", "User=www-data",
		"/bin/sh", "-c", "cat /run/credentials/@system/db-password; cat /secrets/db-password; exit 0")
	must.Eq(t, 0, code)
	must.StrNotContains(t, out, secret)
	must.StrContains(t, errOut, "/run/credentials/@system/db-password: Permission denied")
	must.StrContains(t, errOut, "/secrets/db-password: Permission denied")

	// The staged copy is root's alone, on a tmpfs.
	stage := filepath.Join(credentialsRunDir, machine)
	fi, err := os.Stat(stage)
	must.NoError(t, err)
	must.Eq(t, os.FileMode(0o700), fi.Mode().Perm())
	fi, err = os.Stat(filepath.Join(stage, "db-password"))
	must.NoError(t, err)
	must.Eq(t, os.FileMode(0o400), fi.Mode().Perm())
	var st unix.Statfs_t
	must.NoError(t, unix.Statfs(stage, &st))
	must.Eq(t, int64(unix.TMPFS_MAGIC), int64(st.Type), must.Sprint("the staged credentials are not on a tmpfs"))

	// Nowhere else: the machine's directory (its root, console log, state), the unit, the
	// transient unit file and the host's journal.
	must.NoError(t, filepath.WalkDir(td.machineDir(t, cfg), func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return nil
		}
		b, err := os.ReadFile(p)
		if err == nil && strings.Contains(string(b), secret) {
			t.Errorf("the secret is in %s", p)
		}
		return nil
	}))
	must.StrNotContains(t, run(t, "systemctl", "show", machine+".service"), secret)
	must.StrNotContains(t, run(t, "journalctl", "--no-pager", "-o", "cat", "--since", since.Format("2006-01-02 15:04:05")), secret)
	if b, err := os.ReadFile("/run/systemd/transient/" + machine + ".service"); err == nil {
		must.StrNotContains(t, string(b), secret)
	}
	must.StrNotContains(t, logs(t, cfg), secret)

	must.NoError(t, td.d.DestroyTask(cfg.ID, true))
	_, err = os.Stat(stage)
	must.True(t, os.IsNotExist(err), must.Sprintf("%s is still there after destroy", stage))
}

// A credential whose file is missing, is a link out of the secrets directory or is no regular
// file fails the start with the name and the file, and leaves nothing behind.
func TestCredentialRefusalsLeaveNothing(t *testing.T) {
	dataDir := t.TempDir()
	td := newTestDriver(t, dataDir)
	before := inventory(t, dataDir)
	outside := filepath.Join(t.TempDir(), "host-file")
	must.NoError(t, os.WriteFile(outside, []byte("host only"), 0o600))
	for _, c := range []struct {
		name, file, want string
		prepare          func(secrets string)
	}{
		{"missing file", "db-password", `credential "db" from "db-password": no such file`, nil},
		{"link out of the secrets directory", "escape", `credential "db" from "escape"`, func(secrets string) {
			must.NoError(t, os.Symlink(outside, filepath.Join(secrets, "escape")))
		}},
		{"a directory", "dir", `credential "db" from "dir": not a regular file`, func(secrets string) {
			must.NoError(t, os.Mkdir(filepath.Join(secrets, "dir"), 0o700))
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			cfg := td.newTask(t, "badcred", tinyToplevel(t), nil, withConfig(func(tc *TaskConfig) {
				tc.Credentials = []map[string]string{{"ok": "fine", "db": c.file}}
			}))
			must.NoError(t, os.WriteFile(filepath.Join(cfg.TaskDir().SecretsDir, "fine"), []byte("x"), 0o600))
			if c.prepare != nil {
				c.prepare(cfg.TaskDir().SecretsDir)
			}
			_, _, err := td.StartTask(cfg)
			must.ErrorContains(t, err, "credentials: ")
			must.ErrorContains(t, err, c.want)
			must.StrNotContains(t, err.Error(), "host only")
			must.SliceEmpty(t, leftovers(t, dataDir, before), must.Sprint(leftovers(t, dataDir, before)))
		})
	}
}
