// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package nspawn

import (
	"fmt"
	"strconv"
	"strings"
	"syscall"

	sddbus "github.com/coreos/go-systemd/v22/dbus"
	"github.com/godbus/dbus/v5"
)

func prop(name string, value any) sddbus.Property {
	return sddbus.Property{Name: name, Value: dbus.MakeVariant(value)}
}

type deviceAllow struct {
	Path   string
	Access string
}

// ipAddress is an entry of IPAddressAllow= and IPAddressDeny=, a prefix; a zero-length one of
// each family is "any".
type ipAddress struct {
	Family    int32
	Address   []byte
	PrefixLen uint32
}

// allowList is the value of RestrictAddressFamilies= and SystemCallFilter=: the items allowed,
// or (Allow false) the items denied.
type allowList struct {
	Allow bool
	Items []string
}

type execCommand struct {
	Path             string
	Args             []string
	UncleanIsFailure bool
}

// execCommandEx is an entry of ExecStartEx: ExecStart with flags (systemd 243 and later).
type execCommandEx struct {
	Path  string
	Args  []string
	Flags []string
}

type exitStatusSet struct {
	Statuses []int32
	Signals  []int32
}

// UnitProperties are the properties of the transient service that runs the machine.
//
// Its sandboxing is that of the stock systemd-nspawn@.service (systemd-analyze security scores
// them alike) and no tighter, because whatever the unit sets, the guest inherits, and nspawn
// confines the guest itself (user namespace, seccomp filter, capability set):
//   - root with every capability, no PrivateUsers=, RestrictNamespaces=, NoNewPrivileges=:
//     nspawn makes the guest's namespaces and user mapping and then drops to the guest's set;
//     a guest's setuid programs (sudo) need the unit without NoNewPrivileges=.
//   - no ProtectSystem=, ProtectHome=, PrivateTmp=, PrivateMounts=: nspawn mounts the root, the
//     store and the binds from wherever the host keeps them (a data_dir under /tmp included).
//   - no SystemCallFilter=, SystemCallArchitectures=, MemoryDenyWriteExecute=, LockPersonality=,
//     RestrictRealtime=, RestrictSUIDSGID=, UMask=: a unit-wide filter would bound what nspawn's
//     own filter and the task's system_call_filter allow the guest (32-bit programs, JITs,
//     setuid files, its own file modes).
//   - no PrivateNetwork=, IPAddressDeny=, RestrictAddressFamilies=: they would apply to the
//     guest's traffic too; nspawn makes the veth over netlink. In group mode the unit joins its
//     task group's namespace (NetworkNamespacePath=), and the guest with it.
//   - no ProtectKernel*=, ProtectClock=, ProtectControlGroups=, ProtectHostname=: nspawn gives the
//     guest read-only /proc/sys and /sys, its own UTS namespace and a delegated cgroup subtree.
//   - Delegate=yes (the guest's systemd runs its subtree), DeviceAllow= /dev/net/tun and ptys.
func (s *Spec) UnitProperties() ([]sddbus.Property, error) {
	props := []sddbus.Property{
		sddbus.PropDescription(s.Description),
		// ignore-failure: the exit status is in ExitFile either way.
		execStart(s.Args(), true),
		// nspawn says READY=1 only once the guest did (--notify-ready=yes), so activation of the
		// unit is the guest's readiness, and TimeoutStartSec is the ready timeout.
		sddbus.PropType("notify"),
		prop("NotifyAccess", "main"),
		prop("TimeoutStartUSec", uint64(s.ReadyTimeout.Microseconds())),
		// nspawn runs its own cgroup subtree for the guest, and a guest systemd needs it writable.
		prop("Delegate", true),
		// SIGTERM goes to nspawn only, which turns it into SIGRTMIN+3 for the guest (an orderly
		// shutdown); the final SIGKILL reaches every process of the machine.
		prop("KillMode", "mixed"),
		prop("KillSignal", int32(syscall.SIGTERM)),
		prop("TimeoutStopUSec", uint64(s.StopTimeout.Microseconds())),
		// Keeps a failed unit's ExecMainStatus and Result loaded after nspawn exits, so the exit
		// status is still there for a plugin that was down when the machine ended.
		sddbus.PropRemainAfterExit(true),
		// A successful exit is not kept: nspawn sends STOPPING=1, which turns the end into a stop,
		// and systemd unloads a stopped transient unit at once. So the unit writes its own result
		// where the driver finds it. /bin/sh is on every systemd host, NixOS included.
		prop("ExecStopPost", []execCommand{{
			Path: "/bin/sh",
			Args: []string{"/bin/sh", "-c", `umask 077; printf '%s %s %s\n' "$SERVICE_RESULT" "$EXIT_CODE" "$EXIT_STATUS" >'` + s.ExitFile + `'`},
		}}),
		sddbus.PropSlice(s.Slice),
		prop("MemoryAccounting", true),
		prop("CPUAccounting", true),
		prop("TasksAccounting", true),
		prop("IOAccounting", true),
		// An OOM kill inside the machine is the guest's business (it may restart the service);
		// the driver reports it and the exit, instead of systemd stopping the whole machine.
		prop("OOMPolicy", "continue"),
		prop("StandardInput", "null"),
		// The console goes to a file, in one ordered stream: appending to a local file never
		// blocks the machine for long, and nothing rate-limits it as journald does. The console
		// helper forwards it to Nomad from an offset that survives restarts (package console).
		prop("StandardOutputFileToAppend", s.ConsoleFile),
		prop("StandardError", "inherit"),
		// As systemd-nspawn@.service: no device nodes but the ones a container needs.
		prop("DevicePolicy", "closed"),
		prop("DeviceAllow", s.deviceAllow()),
	}
	if s.Network.NamespacePath != "" {
		props = append(props, prop("NetworkNamespacePath", s.Network.NamespacePath))
	}
	// No tmpfs of nspawn's on /tmp: a mount made outside the guest's user namespace is locked
	// there, and the guest's systemd fails to unmount it at poweroff (mountunits.go). /tmp is
	// the root's directory then, as on a NixOS host without boot.tmp.useTmpfs, and a guest that
	// wants a tmpfs mounts its own. Losing nosuid/nodev there gives the guest nothing it lacks
	// in /var/tmp: its IDs and devices are its user namespace's.
	env := []string{"SYSTEMD_NSPAWN_TMPFS_TMP=0"}
	if s.UnifiedCgroup {
		env = append(env, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1")
	}
	props = append(props, prop("Environment", env))
	if s.RebootPolicy == RebootRestart {
		props = append(props, prop("RestartForceExitStatus", exitStatusSet{Statuses: []int32{ExitReboot}, Signals: []int32{}}))
	}
	r := s.Resources
	if r.MemoryMaxBytes > 0 {
		props = append(props, prop("MemoryMax", r.MemoryMaxBytes), prop("MemorySwapMax", uint64(0)))
	}
	if r.MemoryLowBytes > 0 {
		props = append(props, prop("MemoryLow", r.MemoryLowBytes))
	}
	if r.CPUWeight > 0 {
		props = append(props, prop("CPUWeight", r.CPUWeight))
	}
	if r.AllowedCPUs != "" {
		mask, err := CPUMask(r.AllowedCPUs)
		if err != nil {
			return nil, err
		}
		props = append(props, prop("AllowedCPUs", mask))
	}
	if r.TasksMax > 0 {
		props = append(props, prop("TasksMax", r.TasksMax))
	}
	return props, nil
}

// deviceAllow is what the machine may open: what a container needs, as systemd-nspawn@.service
// allows it, and the spec's devices.
func (s *Spec) deviceAllow() []deviceAllow {
	out := []deviceAllow{{"/dev/net/tun", "rwm"}, {"char-pts", "rw"}}
	for _, d := range s.Devices {
		out = append(out, deviceAllow{d.Source, d.Access})
	}
	return out
}

// execStart is a unit's command, passed exactly. systemd expands $VAR, ${VAR} and $$ in
// ExecStart= when it runs it (% specifiers only in unit files, never in properties set over
// D-Bus), so a command with a '$' is given as ExecStartEx= with no-env-expand (systemd 243 and
// later). A command without one stays ExecStart=: systemd 252 (Debian 12) writes ExecStartEx=
// into the transient unit file under a key it cannot read back, so after a daemon-reload the unit
// has no command left (for a machine's in-place reboot); newer versions write ExecStart= with the
// flag. ignoreFailure is systemd's "-" prefix.
func execStart(args []string, ignoreFailure bool) sddbus.Property {
	for _, a := range args {
		if strings.Contains(a, "$") {
			var flags []string
			if ignoreFailure {
				flags = append(flags, "ignore-failure")
			}
			flags = append(flags, "no-env-expand")
			return prop("ExecStartEx", []execCommandEx{{Path: args[0], Args: args, Flags: flags}})
		}
	}
	return sddbus.PropExecStart(args, ignoreFailure)
}

// CPUMask turns a cpuset list such as "0-2,5" into systemd's AllowedCPUs byte mask.
func CPUMask(list string) ([]byte, error) {
	var mask []byte
	set := func(cpu int) {
		for len(mask) <= cpu/8 {
			mask = append(mask, 0)
		}
		mask[cpu/8] |= 1 << (cpu % 8)
	}
	for _, part := range strings.Split(list, ",") {
		lo, hi, isRange := strings.Cut(strings.TrimSpace(part), "-")
		first, err := strconv.Atoi(lo)
		last := first
		if err == nil && isRange {
			last, err = strconv.Atoi(hi)
		}
		if err != nil || first < 0 || last < first || last > 8191 {
			return nil, fmt.Errorf("invalid cpuset %q: want a list like \"0-2,5\"", list)
		}
		for cpu := first; cpu <= last; cpu++ {
			set(cpu)
		}
	}
	return mask, nil
}
