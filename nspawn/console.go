// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package nspawn

import (
	"strconv"
	"strings"
	"syscall"
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
	return append([]sddbus.Property{
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
	}, f.sandbox()...)
}

// sandbox confines the forwarder to what it does: read and write its machine directory and
// write to Nomad's FIFOs. It stays root only to own those files (root made them, mode 0600),
// with no capability at all, so it can touch nothing else that root owns through permissions
// alone; everything else systemd can take away, it takes.
func (f *Forwarder) sandbox() []sddbus.Property {
	used := []string{f.Helper, f.MachineDir, f.FIFO, f.StderrFIFO}
	props := []sddbus.Property{
		prop("CapabilityBoundingSet", uint64(0)),
		prop("AmbientCapabilities", uint64(0)),
		prop("NoNewPrivileges", true),
		prop("ProtectSystem", "strict"),
		prop("ReadWritePaths", []string{f.MachineDir}),
		prop("PrivateDevices", true),
		prop("DevicePolicy", "closed"),
		prop("PrivateNetwork", true),
		prop("IPAddressDeny", []ipAddress{
			{Family: syscall.AF_INET, Address: make([]byte, 4)},
			{Family: syscall.AF_INET6, Address: make([]byte, 16)},
		}),
		// sd_notify and the fd store are all the sockets it needs.
		prop("RestrictAddressFamilies", allowList{Allow: true, Items: []string{"AF_UNIX"}}),
		prop("PrivateUsers", true),
		prop("ProtectKernelTunables", true),
		prop("ProtectKernelModules", true),
		prop("ProtectKernelLogs", true),
		prop("ProtectControlGroups", true),
		prop("ProtectClock", true),
		prop("ProtectHostname", true),
		prop("ProtectProc", "invisible"),
		prop("ProcSubset", "pid"),
		// The namespaces a unit may create: none.
		prop("RestrictNamespaces", uint64(0)),
		prop("RestrictRealtime", true),
		prop("RestrictSUIDSGID", true),
		prop("LockPersonality", true),
		prop("MemoryDenyWriteExecute", true),
		prop("SystemCallArchitectures", []string{"native"}),
		prop("SystemCallFilter", allowList{Allow: true, Items: []string{"@system-service"}}),
		// A call outside the filter fails instead of killing the forwarder mid-write.
		prop("SystemCallErrorNumber", int32(syscall.EPERM)),
		prop("RemoveIPC", true),
		prop("KeyringMode", "private"),
		prop("UMask", uint32(0o077)),
	}
	// A private /tmp or an empty /home would hide a data_dir or alloc dir that lives there.
	if !underAny(used, "/tmp", "/var/tmp") {
		props = append(props, prop("PrivateTmp", true))
	}
	if underAny(used, "/home", "/root", "/run/user") {
		props = append(props, prop("ProtectHome", "read-only"))
	} else {
		props = append(props, prop("ProtectHome", "yes"))
	}
	return props
}

// underAny says whether one of paths is dir or below it, for one of dirs.
func underAny(paths []string, dirs ...string) bool {
	for _, p := range paths {
		for _, d := range dirs {
			if p == d || strings.HasPrefix(p, d+"/") {
				return true
			}
		}
	}
	return false
}
