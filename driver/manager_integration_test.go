// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

//go:build integration

package driver

import (
	"context"
	"sync"
	"testing"

	"github.com/shoenig/test/must"

	"github.com/nomad-nixos/nomad-driver-nixos/nspawn"
)

// Many tasks at once read their units and machines: far more calls than dbus-daemon lets one
// connection have awaiting replies (128), which it refuses with LimitsExceeded.
func TestManagerManyCallsAtOnce(t *testing.T) {
	const callers = 300
	mgr := nspawn.NewManager()
	defer mgr.Close()
	ctx := context.Background()
	errs := make(chan error, 3*callers)
	var wg sync.WaitGroup
	for range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			st, err := mgr.Status(ctx, "systemd-journald.service")
			if err == nil && !st.Ready() {
				t.Errorf("systemd-journald.service: %+v", st)
			}
			errs <- err
			st, err = mgr.Status(ctx, "nomad-absent.service")
			if err == nil && st.Loaded() {
				t.Errorf("nomad-absent.service: %+v", st)
			}
			errs <- err
			_, err = mgr.Registered("nomad-absent")
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		must.NoError(t, err)
	}
}

// Known answers from what systemd holds: a running unit is known, a name it never loaded is not.
func TestManagerKnown(t *testing.T) {
	mgr := nspawn.NewManager()
	defer mgr.Close()
	ctx := context.Background()
	known, err := mgr.Known(ctx, "systemd-journald.service")
	must.NoError(t, err)
	must.True(t, known)
	known, err = mgr.Known(ctx, "nomad-never-loaded.service")
	must.NoError(t, err)
	must.False(t, known)
}
