// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

//go:build integration

package driver

import (
	"context"
	"sync"
	"testing"
	"time"

	sddbus "github.com/coreos/go-systemd/v22/dbus"
	"github.com/godbus/dbus/v5"
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

// A Status of a unit systemd does not hold makes it load none: a property read of such a unit
// loads one and unloads it again, signalling both. A read of another absent unit after the
// Status shows the signals arrive; systemd sends them in the order it handled the reads.
func TestManagerStatusLoadsNoUnit(t *testing.T) {
	const systemd = "org.freedesktop.systemd1"
	mgr := nspawn.NewManager()
	defer mgr.Close()
	conn, err := dbus.ConnectSystemBus()
	must.NoError(t, err)
	defer conn.Close()
	signals := make(chan *dbus.Signal, 64)
	conn.Signal(signals)
	must.NoError(t, conn.AddMatchSignal(dbus.WithMatchSender(systemd), dbus.WithMatchMember("UnitNew")))
	must.NoError(t, conn.Object(systemd, "/org/freedesktop/systemd1").Call(systemd+".Manager.Subscribe", 0).Err)

	absent, marker := "nomad-status-absent.service", "nomad-status-marker.service"
	st, err := mgr.Status(context.Background(), absent)
	must.NoError(t, err)
	must.EqOp(t, "not-found", st.LoadState)
	var v dbus.Variant
	must.NoError(t, conn.Object(systemd, dbus.ObjectPath("/org/freedesktop/systemd1/unit/"+sddbus.PathBusEscape(marker))).
		Call("org.freedesktop.DBus.Properties.Get", 0, systemd+".Unit", "LoadState").Store(&v))
	timeout := time.After(scaled(30 * time.Second))
	for {
		select {
		case s := <-signals:
			if len(s.Body) == 0 {
				continue
			}
			name, _ := s.Body[0].(string)
			must.NotEqOp(t, absent, name, must.Sprint("Status made systemd load the unit"))
			if name == marker {
				return
			}
		case <-timeout:
			t.Fatalf("no UnitNew for %s within %s", marker, scaled(30*time.Second))
		}
	}
}
