// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package driver

import (
	"net/netip"
	"time"

	"github.com/nomad-nixos/nomad-driver-nixos/hostnet"
)

// taskHandleVersion is the version of TaskState inside Nomad's task handles.
const taskHandleVersion = 1

// TaskState is what Nomad keeps for a task across plugin and client restarts: enough to find the
// machine again without the task's raw config, which Nomad does not keep (see RecoverTask).
type TaskState struct {
	Config       TaskConfig
	Machine      string
	Unit         string
	InvocationID string
	MachineDir   string
	StartedAt    time.Time
	// Link is the machine's veth addressing, for machines with the driver's link: a machine that
	// reboots in place gets a new pair, which the handle addresses again.
	Link *LinkState
}

// LinkState is a machine's addressing as prefixes ("" for a family not used).
type LinkState struct {
	HostIPv4, GuestIPv4, HostIPv6, GuestIPv6 string
}

func linkState(a hostnet.Addressing) *LinkState {
	str := func(p netip.Prefix) string {
		if !p.IsValid() {
			return ""
		}
		return p.String()
	}
	return &LinkState{str(a.HostIPv4), str(a.GuestIPv4), str(a.HostIPv6), str(a.GuestIPv6)}
}

func (l *LinkState) addressing() hostnet.Addressing {
	parse := func(s string) netip.Prefix {
		p, _ := netip.ParsePrefix(s)
		return p
	}
	return hostnet.Addressing{HostIPv4: parse(l.HostIPv4), GuestIPv4: parse(l.GuestIPv4), HostIPv6: parse(l.HostIPv6), GuestIPv6: parse(l.GuestIPv6)}
}
