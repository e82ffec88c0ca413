// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

//go:build e2e

package e2e

import (
	"strings"
	"testing"
	"time"

	"github.com/shoenig/test/must"
)

// readCredential runs a guest service as www-data that takes the credential db-password with
// LoadCredential= and prints it.
func readCredential(t *testing.T, allocID string) string {
	t.Helper()
	code, out, errOut := allocExec(t, allocID, "", "systemd-run", "--quiet", "--wait", "--pipe",
		"-p", "LoadCredential=db-password", "-p", "User=www-data", "/bin/sh", "-c", `cat "$CREDENTIALS_DIRECTORY/db-password"`)
	must.Eq(t, 0, code, must.Sprintf("stdout %q, stderr %q", out, errOut))
	return out
}

// A template renders a Nomad variable into the secrets directory, the task makes it a credential,
// and a guest service reads it with LoadCredential=. With change_mode = "restart" a new value
// restarts the task, and the new machine has it; with "signal" the machine keeps the value it
// booted with (credentials are read when a machine starts) while the signal reaches its PID 1.
func TestTemplateCredential(t *testing.T) {
	for _, c := range []struct{ mode, id string }{{"restart", "e2e-cred-restart"}, {"signal", "e2e-cred-signal"}} {
		t.Run(c.mode, func(t *testing.T) {
			path := "nomad/jobs/" + c.id
			nomad(t, "var", "put", "-force", path, "password=first-value-1d7c")
			t.Cleanup(func() { _, _ = nomadErr("var", "purge", path) })
			runJob(t, c.id, "storage.nomad.hcl", map[string]any{"toplevel": systemd(t), "var_path": path, "change_mode": c.mode})
			alloc := waitAlloc(t, c.id, 2*time.Minute, "running", running)
			waitOutput(t, time.Minute, "longrun: started", func() string {
				out, _ := nomadErr("alloc", "logs", alloc.ID, "t")
				return out
			})
			must.Eq(t, "first-value-1d7c", readCredential(t, alloc.ID))

			nomad(t, "var", "put", "-force", path, "password=second-value-93aa")
			switch c.mode {
			case "restart":
				a := waitAlloc(t, c.id, 2*time.Minute, "a restart by the template", func(a allocation) bool {
					return a.TaskStates["t"].Restarts == 1 && a.TaskStates["t"].State == "running"
				})
				must.True(t, hasEvent(a.TaskStates["t"], "Restart Signaled", "Template with change_mode restart re-rendered"), must.Sprint(pretty(a.TaskStates["t"].Events)))
				waitOutput(t, 2*time.Minute, "second-value-93aa", func() string {
					code, out, _ := allocExec(t, alloc.ID, "", "systemd-run", "--quiet", "--wait", "--pipe",
						"-p", "LoadCredential=db-password", "/bin/cat", "/run/credentials/@system/db-password")
					if code != 0 {
						return ""
					}
					return out
				})
				must.Eq(t, "second-value-93aa", readCredential(t, alloc.ID))
			case "signal":
				waitAlloc(t, c.id, time.Minute, "the template's signal", func(a allocation) bool {
					return hasEvent(a.TaskStates["t"], "Signaling", "Template re-rendered")
				})
				a := allocations(t, c.id)[0]
				must.Eq(t, 0, a.TaskStates["t"].Restarts)
				must.Eq(t, "first-value-1d7c", readCredential(t, alloc.ID))
			}
			logs, _ := nomadErr("alloc", "logs", alloc.ID, "t")
			must.False(t, strings.Contains(logs, "value-"), must.Sprint("a credential reached the task's logs"))
		})
	}
}
