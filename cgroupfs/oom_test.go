// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package cgroupfs

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/shoenig/test/must"
)

// On cgroup v2 the watcher follows memory.events with inotify; a plain file stands in for it.
func TestWatchOOMv2(t *testing.T) {
	base := t.TempDir()
	dir := filepath.Join(base, "machine.slice", "m.service")
	must.NoError(t, os.MkdirAll(dir, 0o755))
	events := filepath.Join(dir, "memory.events")
	must.NoError(t, os.WriteFile(events, []byte("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n"), 0o644))

	ctx, cancel := context.WithCancel(context.Background())
	kills := make(chan struct{}, 10)
	done := make(chan error, 1)
	go func() {
		done <- Cgroups{Base: base, Mode: CgroupUnified}.WatchOOM(ctx, "/machine.slice/m.service", func() { kills <- struct{}{} })
	}()
	// Let the watch be in place, then two more kills.
	time.Sleep(100 * time.Millisecond)
	must.NoError(t, os.WriteFile(events, []byte("low 0\nhigh 0\nmax 9\noom 3\noom_kill 3\n"), 0o644))
	for i := 0; i < 2; i++ {
		select {
		case <-kills:
		case <-time.After(5 * time.Second):
			t.Fatalf("OOM kill %d was not reported", i+1)
		}
	}
	// Other counters changing is no OOM kill.
	must.NoError(t, os.WriteFile(events, []byte("low 0\nhigh 5\nmax 9\noom 3\noom_kill 3\n"), 0o644))
	select {
	case <-kills:
		t.Fatal("a change of other counters was reported as an OOM kill")
	case <-time.After(300 * time.Millisecond):
	}
	cancel()
	select {
	case err := <-done:
		must.NoError(t, err)
	case <-time.After(5 * time.Second):
		t.Fatal("the watcher did not stop with its context")
	}
}
