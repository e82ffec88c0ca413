// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package driver

import (
	"net/netip"
	"testing"

	"github.com/hashicorp/nomad/nomad/structs"
	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/shoenig/test/must"

	"github.com/nomad-nixos/nomad-driver-nixos/hostnet"
	"github.com/nomad-nixos/nomad-driver-nixos/nspawn"
)

func TestPoolsAddressing(t *testing.T) {
	p, err := parsePools("10.235.0.0/16", "fd35:6e78:6f73::/48")
	must.NoError(t, err)
	must.EqOp(t, 1<<14, p.slots())
	a := p.addressing(0)
	must.EqOp(t, netip.MustParsePrefix("10.235.0.1/30"), a.HostIPv4)
	must.EqOp(t, netip.MustParsePrefix("10.235.0.2/30"), a.GuestIPv4)
	must.EqOp(t, netip.MustParsePrefix("fd35:6e78:6f73::1/126"), a.HostIPv6)
	must.EqOp(t, netip.MustParsePrefix("fd35:6e78:6f73::2/126"), a.GuestIPv6)
	a = p.addressing(300)
	must.EqOp(t, netip.MustParsePrefix("10.235.4.178/30"), a.GuestIPv4)
	must.EqOp(t, netip.MustParsePrefix("fd35:6e78:6f73::4b2/126"), a.GuestIPv6)
	last := p.addressing(p.slots() - 1)
	must.EqOp(t, netip.MustParsePrefix("10.235.255.254/30"), last.GuestIPv4)

	// One family only; the smaller pool bounds the slots.
	p, err = parsePools("", "fd00::/120")
	must.NoError(t, err)
	must.EqOp(t, 64, p.slots())
	must.False(t, p.addressing(1).GuestIPv4.IsValid())
	p, err = parsePools("192.168.7.0/24", "fd00::/48")
	must.NoError(t, err)
	must.EqOp(t, 64, p.slots())
	_, err = parsePools("", "")
	must.ErrorContains(t, err, "both empty")
}

func TestForwards(t *testing.T) {
	p, err := parsePools("10.235.0.0/16", "fd35:6e78:6f73::/48")
	must.NoError(t, err)
	a := p.addressing(0)
	cfg := &drivers.TaskConfig{Resources: &drivers.Resources{Ports: &structs.AllocatedPorts{
		{Label: "http", Value: 23456, To: 80},
		{Label: "admin", Value: 23457},
	}}}
	fwds, portMap, err := forwards(cfg, []string{"http", "admin"}, a)
	must.NoError(t, err)
	must.Eq(t, map[string]int{"http": 80, "admin": 23457}, portMap)
	// Each label: TCP and UDP, IPv4 and IPv6.
	must.Len(t, 8, fwds)
	must.Eq(t, hostnet.Forward{Proto: "tcp", HostPort: 23456, Guest: netip.MustParseAddr("10.235.0.2"), GuestPort: 80}, fwds[0])
	must.Eq(t, hostnet.Forward{Proto: "udp", HostPort: 23457, Guest: netip.MustParseAddr("fd35:6e78:6f73::2"), GuestPort: 23457}, fwds[7])

	_, _, err = forwards(cfg, []string{"http", "db"}, a)
	must.ErrorContains(t, err, `ports[1] = "db": the allocation has no port of that label (it has: http, admin)`)
	_, _, err = forwards(&drivers.TaskConfig{Resources: &drivers.Resources{}}, []string{"http"}, a)
	must.ErrorContains(t, err, `ports[0] = "http": the allocation has no port of that label (it has: none)`)

	n := driverNetwork(a, portMap)
	must.EqOp(t, "10.235.0.2", n.IP)
	must.Eq(t, portMap, n.PortMap)
}

func TestResolvConfFromNomadDNS(t *testing.T) {
	got := string(resolvConf(&drivers.DNSConfig{
		Servers: []string{"10.0.0.53", "fd00::53"}, Searches: []string{"svc.example.org", "example.org"}, Options: []string{"ndots:2"},
	}, nspawn.NetworkVeth))
	must.EqOp(t, "# From the Nomad task's dns block (nomad-driver-nixos).\nnameserver 10.0.0.53\nnameserver fd00::53\nsearch svc.example.org example.org\noptions ndots:2\n", got)
}
