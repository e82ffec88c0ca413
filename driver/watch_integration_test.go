// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

//go:build integration

package driver

import (
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/hashicorp/nomad/helper/uuid"
	"github.com/shoenig/test/must"

	"github.com/nomad-nixos/nomad-driver-nixos/nspawn"
)

// The manager's watches wake on systemd's and machined's signals, with no polling behind them:
// a unit's start, a machine's registration, and the stop that ends both.
func TestManagerWatches(t *testing.T) {
	mgr := nspawn.NewManager()
	defer mgr.Close()
	name := "nomad-watch-" + uuid.Generate()[:8]
	unit, unwatch := mgr.WatchUnit(name + ".service")
	defer unwatch()
	machine, unwatchMachine := mgr.WatchMachine(name)
	defer unwatchMachine()
	// Connecting to the bus wakes every watch once, as changes may have been missed before.
	awaitWake(t, unit, "the connection")
	awaitWake(t, machine, "the connection")

	root := filepath.Join(t.TempDir(), "root")
	must.NoError(t, nspawn.PrepareRoot(root))
	defer func() { must.NoError(t, nspawn.RemoveRoot(root)) }()
	must.NoError(t, bareStart(name, root, tinyToplevel(t), "--private-network"))
	awaitWake(t, unit, "the unit's start")
	awaitWake(t, machine, "the machine's registration")
	// The start's last changes may still be on their way: let them arrive and drop them, so the
	// wake-ups below are the stop's.
	time.Sleep(time.Second)
	drain(unit)
	drain(machine)

	out, err := exec.Command("systemctl", "stop", name).CombinedOutput()
	must.NoError(t, err, must.Sprint(string(out)))
	_ = exec.Command("systemctl", "reset-failed", name).Run()
	awaitWake(t, unit, "the unit's stop")
	awaitWake(t, machine, "the machine's end")
}

func awaitWake(t *testing.T, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(scaled(30 * time.Second)):
		t.Fatalf("no wake-up for %s", what)
	}
}

func drain(ch <-chan struct{}) {
	select {
	case <-ch:
	default:
	}
}
