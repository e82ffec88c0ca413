// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

//go:build e2e

package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/shoenig/test/must"
	"github.com/shoenig/test/wait"
)

// waitBooted waits until the job's machine (the systemd fixture) is running and has started its
// services, so that systemd-run reaches its systemd.
func waitBooted(t *testing.T, jobID string) allocation {
	t.Helper()
	alloc := waitAlloc(t, jobID, 2*time.Minute, "running", running)
	waitOutput(t, time.Minute, "longrun: started", func() string {
		out, _ := nomadErr("alloc", "logs", alloc.ID, "t")
		return out
	})
	return alloc
}

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
			alloc := waitBooted(t, c.id)
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

// createHostVolume makes a dynamic host volume with Nomad's mkdir plugin and returns its name and
// its directory on the client; it is deleted when the test ends. The name is the test run's own:
// jobs find a volume by name, and one left by an earlier run must not be found.
func createHostVolume(t *testing.T, prefix string) (string, string) {
	t.Helper()
	name := fmt.Sprintf("%s-%d", prefix, time.Now().UnixNano())
	spec := filepath.Join(t.TempDir(), "volume.hcl")
	must.NoError(t, os.WriteFile(spec, []byte(`name = "`+name+`"
type      = "host"
plugin_id = "mkdir"
capability {
  access_mode     = "single-node-writer"
  attachment_mode = "file-system"
}
capability {
  access_mode     = "single-node-reader-only"
  attachment_mode = "file-system"
}
`), 0o644))
	out := nomad(t, "volume", "create", "-detach", spec)
	id := strings.TrimSpace(out[strings.LastIndex(out, " ")+1:])
	// Deleting a volume fails while a purged job's allocation still claims it.
	t.Cleanup(func() {
		_ = wait.InitialSuccess(wait.ErrorFunc(func() error {
			out, err := nomadErr("volume", "delete", "-type", "host", id)
			if err != nil {
				return fmt.Errorf("%v: %s", err, out)
			}
			return nil
		}), wait.Timeout(time.Minute), wait.Gap(time.Second)).Run()
	})
	var vol struct{ HostPath, State string }
	waitOutput(t, time.Minute, "ready", func() string {
		api(t, "/v1/volume/host/"+id, &vol)
		return vol.State
	})
	return name, vol.HostPath
}

// A Nomad host volume reaches the machine at its destination: a guest service running as
// www-data writes there, the client sees the files as UID 33, a second allocation finds them,
// and a read-only mount refuses writes. A destination over the machine's store fails the task
// with the reason.
func TestHostVolume(t *testing.T) {
	volume, dir := createHostVolume(t, "e2e-data")
	runJob(t, "e2e-volume-1", "storage.nomad.hcl", map[string]any{"toplevel": systemd(t), "volume": volume})
	alloc := waitBooted(t, "e2e-volume-1")
	code, out, errOut := allocExec(t, alloc.ID, "", "/bin/sh", "-c", "chown www-data: /var/lib/app && systemd-run --quiet --wait --pipe -p User=www-data /bin/sh -c 'echo from-alloc-1 >/var/lib/app/data && stat -c %U /var/lib/app/data'")
	must.Eq(t, 0, code, must.Sprintf("stdout %q, stderr %q", out, errOut))
	must.Eq(t, "www-data\n", out)
	must.Eq(t, "33 from-alloc-1\n", host(t, "sh", "-c", "printf '%s ' $(stat -c %u "+dir+"/data); cat "+dir+"/data"))
	nomad(t, "job", "stop", "-purge", "e2e-volume-1")
	waitOutput(t, time.Minute, "gone", func() string {
		if strings.Contains(strings.Join(machinesOnHost(t), " "), "nomad-"+alloc.ID[:8]) {
			return "running"
		}
		return "gone"
	})
	must.Eq(t, "from-alloc-1\n", host(t, "cat", dir+"/data"))

	t.Run("a second allocation has the data", func(t *testing.T) {
		runJob(t, "e2e-volume-2", "storage.nomad.hcl", map[string]any{"toplevel": systemd(t), "volume": volume})
		alloc := waitBooted(t, "e2e-volume-2")
		code, out, errOut := allocExec(t, alloc.ID, "", "systemd-run", "--quiet", "--wait", "--pipe", "-p", "User=www-data", "/bin/sh", "-c", "cat /var/lib/app/data && echo from-alloc-2 >>/var/lib/app/data")
		must.Eq(t, 0, code, must.Sprintf("stdout %q, stderr %q", out, errOut))
		must.Eq(t, "from-alloc-1\n", out)
		nomad(t, "job", "stop", "-purge", "e2e-volume-2")
	})

	t.Run("read-only", func(t *testing.T) {
		runJob(t, "e2e-volume-ro", "storage.nomad.hcl", map[string]any{"toplevel": systemd(t), "volume": volume, "read_only": true})
		alloc := waitBooted(t, "e2e-volume-ro")
		code, out, errOut := allocExec(t, alloc.ID, "", "/bin/sh", "-c", "cat /var/lib/app/data; echo x >>/var/lib/app/data")
		must.NotEq(t, 0, code)
		must.Eq(t, "from-alloc-1\nfrom-alloc-2\n", out)
		must.StrContains(t, errOut, "Read-only file system")
	})

	t.Run("over the store", func(t *testing.T) {
		runJob(t, "e2e-volume-bad", "storage.nomad.hcl", map[string]any{"toplevel": systemd(t), "volume": volume, "destination": "/nix/store"})
		a := waitAlloc(t, "e2e-volume-bad", time.Minute, "failure", func(a allocation) bool { return a.ClientStatus == "failed" })
		must.True(t, hasEvent(a.TaskStates["t"], "Driver Failure", `volume_mount destination = "/nix/store"`), must.Sprint(pretty(a.TaskStates["t"].Events)))
	})
}
