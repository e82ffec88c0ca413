// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package nspawn

import (
	"slices"
	"strings"
)

// Capabilities are the Linux capability names, each at its bit number.
var Capabilities = []string{
	"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
	"CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
	"CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER",
	"CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT",
	"CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME",
	"CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL",
	"CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM",
	"CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
}

// defaultCapabilities are what systemd-nspawn leaves a guest (systemd-nspawn(1), --capability=).
var defaultCapabilities = []string{
	"CAP_AUDIT_CONTROL", "CAP_AUDIT_WRITE", "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH",
	"CAP_FOWNER", "CAP_FSETID", "CAP_IPC_OWNER", "CAP_KILL", "CAP_LEASE", "CAP_LINUX_IMMUTABLE",
	"CAP_MKNOD", "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_RAW", "CAP_SETFCAP",
	"CAP_SETGID", "CAP_SETPCAP", "CAP_SETUID", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_CHROOT",
	"CAP_SYS_NICE", "CAP_SYS_PTRACE", "CAP_SYS_RESOURCE", "CAP_SYS_TTY_CONFIG",
}

// DefaultCapabilities are the capabilities nspawn gives a guest in a network mode: those above,
// and CAP_NET_ADMIN when the guest has a network namespace of its own.
func DefaultCapabilities(networkMode string) []string {
	caps := slices.Clone(defaultCapabilities)
	if OwnNamespace(networkMode) {
		caps = append(caps, "CAP_NET_ADMIN")
	}
	slices.Sort(caps)
	return caps
}

// CapabilityName is the canonical name of a capability given as "net_admin", "NET_ADMIN" or
// "CAP_NET_ADMIN", and whether Linux has it.
func CapabilityName(s string) (string, bool) {
	name := strings.ToUpper(s)
	if !strings.HasPrefix(name, "CAP_") {
		name = "CAP_" + name
	}
	return name, slices.Contains(Capabilities, name)
}

// Privileges change what nspawn grants a guest by default.
type Privileges struct {
	// AddCaps and DropCaps are capability names, such as "CAP_NET_ADMIN".
	AddCaps, DropCaps []string
	// AllowSystemCalls and DenySystemCalls are system calls or @groups (systemd-analyze
	// syscall-filter) added to and taken from nspawn's filter; a denial wins.
	AllowSystemCalls, DenySystemCalls []string
	NoNewPrivileges                   bool
}

func (p Privileges) args() []string {
	var args []string
	if len(p.AddCaps) > 0 {
		args = append(args, "--capability="+strings.Join(p.AddCaps, ","))
	}
	if len(p.DropCaps) > 0 {
		args = append(args, "--drop-capability="+strings.Join(p.DropCaps, ","))
	}
	if len(p.AllowSystemCalls) > 0 {
		args = append(args, "--system-call-filter="+strings.Join(p.AllowSystemCalls, " "))
	}
	if len(p.DenySystemCalls) > 0 {
		args = append(args, "--system-call-filter=~"+strings.Join(p.DenySystemCalls, " "))
	}
	if p.NoNewPrivileges {
		args = append(args, "--no-new-privileges=yes")
	}
	return args
}
