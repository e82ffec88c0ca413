// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

//go:build e2e

package e2e

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestMain checks, once every test ran and passed, that purging every job leaves nothing of the
// driver on the host. A run of selected tests (-run) skips the check: other jobs may still be due.
func TestMain(m *testing.M) {
	flag.Parse()
	code := m.Run()
	if code == 0 && flag.Lookup("test.run").Value.String() == "" {
		if err := purgeLeavesNothing(2 * time.Minute); err != nil {
			fmt.Fprintln(os.Stderr, "--- FAIL: after purging every job, the driver left something behind:", err)
			code = 1
		} else {
			fmt.Println("after purging every job, nothing of the driver is left on the host")
		}
	}
	os.Exit(code)
}

func purgeLeavesNothing(timeout time.Duration) error {
	resp, err := http.Get(nomadAddr() + "/v1/jobs")
	if err != nil {
		return err
	}
	var jobs []struct{ ID string }
	err = json.NewDecoder(resp.Body).Decode(&jobs)
	resp.Body.Close()
	if err != nil {
		return err
	}
	for _, j := range jobs {
		if out, err := nomadErr("job", "stop", "-purge", j.ID); err != nil {
			return fmt.Errorf("nomad job stop -purge %s: %w: %s", j.ID, err, out)
		}
	}
	checks := map[string]string{
		"machines": "machinectl list --no-legend | grep -oE '^nomad-[^ ]*' || true",
		"units":    "systemctl list-units --all --no-legend --plain 'nomad-*' | grep -v '^nomad-e2e-agent' || true",
		"links":    "ip -o link | grep -oE 've-nomad[^:@]*|vn-[^:@]*' || true",
		"roots":    "ls /var/lib/nomad-driver-nixos/machines /var/lib/nomad-driver-nixos/gcroots /nix/var/nix/gcroots/nomad-driver-nixos /var/lib/nomad-driver-nixos/tmp 2>/dev/null | grep -v '^/\\|^$' || true",
	}
	deadline := time.Now().Add(timeout)
	for {
		var left []string
		for what, script := range checks {
			out, err := exec.Command(filepath.Join(repoRoot, "e2e", "testhost", "testhost.sh"), "exec", "sh", "-c", script).CombinedOutput()
			if err != nil {
				return fmt.Errorf("checking for %s: %w: %s", what, err, out)
			}
			if s := strings.TrimSpace(string(out)); s != "" {
				left = append(left, what+": "+s)
			}
		}
		if len(left) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return errors.New(strings.Join(left, "\n"))
		}
		time.Sleep(250 * time.Millisecond)
	}
}
