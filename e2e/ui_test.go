// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

//go:build e2e

package e2e

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/shoenig/test/must"
)

// The Nomad UI in a real browser: the allocation page of a service job, in Debian's Chromium driven
// by playwright-core (e2e/ui/alloc-page.mjs), shows the task running, the driver's readiness event
// and non-zero CPU and memory. The screenshots stay in build/ as the test's output.
func TestUIAllocationPage(t *testing.T) {
	const jobID, task = "e2e-ui", "web"
	shot := filepath.Join(repoRoot, "build", "ui-allocation.png")
	taskShot := strings.TrimSuffix(shot, ".png") + "-task.png"
	for _, f := range []string{shot, taskShot, strings.TrimSuffix(shot, ".png") + ".html", strings.TrimSuffix(taskShot, ".png") + ".html"} {
		_ = os.Remove(f) // no stale output from an earlier run
	}

	// Chromium and playwright-core (idempotent; quick once installed).
	setupCtx, cancelSetup := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancelSetup()
	start := time.Now()
	out, err := exec.CommandContext(setupCtx, filepath.Join(repoRoot, "e2e", "ui", "setup.sh")).CombinedOutput()
	must.NoError(t, err, must.Sprintf("e2e/ui/setup.sh:\n%s", out))
	t.Logf("e2e/ui/setup.sh took %s", time.Since(start).Round(100*time.Millisecond))

	runJob(t, jobID, "ui.nomad.hcl", map[string]any{"toplevel": systemd(t)})
	alloc := waitAlloc(t, jobID, 2*time.Minute, "running with the readiness event", func(a allocation) bool {
		return running(a) && hasEvent(a.TaskStates[task], "Driver", "Machine is ready")
	})
	// Leave no machine behind for the leftover check, which runs after this file's tests.
	machine := "nomad-" + alloc.ID[:8] + "-" + task
	t.Cleanup(func() {
		_, _ = nomadErr("job", "stop", "-purge", jobID)
		waitOutput(t, 2*time.Minute, "gone", func() string {
			if slices.Contains(machinesOnHost(t), machine) {
				return "machine " + machine + " still runs"
			}
			return "gone"
		})
	})

	// CPU use is only non-zero while the guest works: keep a busy loop running in it during the
	// check (the CLI is killed when the test ends; the loop ends by itself after 60 s).
	burnCtx, stopBurn := context.WithCancel(context.Background())
	defer stopBurn()
	burn := exec.CommandContext(burnCtx, filepath.Join(repoRoot, "build", "nomad"), "alloc", "exec", "-i=false", "-t=false", "-task", task, alloc.ID,
		"/usr/bin/timeout", "60", "/bin/sh", "-c", "while :; do :; done")
	burn.Env = append(os.Environ(), "NOMAD_ADDR="+nomadAddr())
	must.NoError(t, burn.Start())
	go func() { _ = burn.Wait() }()

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "node", filepath.Join(repoRoot, "e2e", "ui", "alloc-page.mjs"), alloc.ID, shot, task)
	cmd.Env = append(os.Environ(), "NOMAD_ADDR="+nomadAddr())
	start = time.Now()
	out, err = cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("the Nomad UI check failed (%v) after %s:\n%s", err, time.Since(start).Round(100*time.Millisecond), out)
	}
	t.Logf("e2e/ui/alloc-page.mjs took %s:\n%s", time.Since(start).Round(100*time.Millisecond), out)
	for _, f := range []string{shot, taskShot} {
		fi, err := os.Stat(f)
		must.NoError(t, err)
		must.Positive(t, fi.Size())
	}
	t.Logf("screenshots: %s (allocation page), %s (task page)", shot, taskShot)
}
