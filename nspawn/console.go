// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package nspawn

import (
	"strconv"
	"time"

	sddbus "github.com/coreos/go-systemd/v22/dbus"
)

// Forwarder is a machine's console forwarder (the console helper binary, see package console).
// It runs as a transient unit of its own: Nomad's log reader stops for good once the last writer
// of its FIFO closes, so the writer must outlive plugin restarts.
type Forwarder struct {
	// Helper is the console helper binary.
	Helper     string
	MachineDir string
	FIFO       string
	StderrFIFO string
	// Backlog is how far, in bytes, Nomad's reader may fall behind before output is dropped.
	Backlog int64
}

// ConsoleUnit is the name of the forwarder unit of a machine.
func ConsoleUnit(machine string) string { return machine + "-console.service" }

// UnitProperties are the properties of the forwarder's transient unit.
func (f *Forwarder) UnitProperties(machineUnit string) []sddbus.Property {
	return []sddbus.Property{
		sddbus.PropDescription("Console of " + machineUnit),
		// Not ignore-failure: a failed forwarder must not count as a success, or it is not
		// restarted. Nomad's FIFO paths hold the task's name, which may hold a '$'.
		execStart([]string{f.Helper, "-dir", f.MachineDir, "-fifo", f.FIFO, "-stderr-fifo", f.StderrFIFO,
			"-backlog", strconv.FormatInt(f.Backlog, 10) + "B"}, false),
		sddbus.PropType("exec"),
		// A forwarder that was killed or lost Nomad's reader exits with a failure; the next one
		// resumes at the saved offset. One that delivered everything exits 0 and stays ended.
		prop("Restart", "on-failure"),
		prop("RestartUSec", uint64(time.Second.Microseconds())),
		// Restarts are the recovery from a reader that went away: never give them up.
		prop("StartLimitIntervalUSec", uint64(0)),
		// The forwarder keeps its FIFO descriptors here, so a restarted one writes to the same
		// open FIFOs: Nomad's reader ends for good once no writer holds one open.
		prop("FileDescriptorStoreMax", uint32(2)),
		prop("NotifyAccess", "main"),
		prop("StandardInput", "null"),
		prop("StandardOutput", "journal"),
	}
}
