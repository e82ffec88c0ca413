// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

// Package hostnet is the host side of machine networking: veth pairs with the driver's
// addresses (netlink) and port forwards and masquerading (nftables). It knows nothing of Nomad
// or nspawn.
package hostnet

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// A machine's veth pair has names and addresses the driver chooses, so the addresses are known
// the moment the machine starts, as NixOS's own containers do with hostAddress and
// localAddress. nspawn makes the pair (--network-veth-extra=<host>:eth0) and the driver
// addresses both ends once the machine is registered. The host side's name is not ve-*, which
// systemd-networkd's stock 80-container-ve.network would claim and readdress.

const (
	// vethHostPrefix starts the host side's name; the rest is a hash of the machine's name.
	vethHostPrefix = "vn-"
	// GuestInterface is the link's name inside the machine.
	GuestInterface = "eth0"
	// vethOwner starts the alias of every host-side link the driver made; the machine follows.
	vethOwner = "nomad-driver-nixos:"
)

// Addressing is a machine's point-to-point link: the host's and the guest's addresses, with the
// link's prefix length. An invalid prefix means the family is not used.
type Addressing struct {
	HostIPv4, GuestIPv4 netip.Prefix
	HostIPv6, GuestIPv6 netip.Prefix
}

// Veth is a machine's veth pair.
type Veth struct {
	Machine string
	// Host is the host side's name.
	Host string
	Addr Addressing
}

// NewVeth names the host side of a machine's pair after a hash of the machine's name: interface
// names have at most 15 characters.
func NewVeth(machine string, addr Addressing) Veth {
	sum := sha256.Sum256([]byte(machine))
	return Veth{Machine: machine, Host: vethHostPrefix + hex.EncodeToString(sum[:])[:12], Addr: addr}
}

// ConfigureHost marks the host side as the driver's, gives it its addresses and brings it up.
func (v Veth) ConfigureHost() error {
	link, err := netlink.LinkByName(v.Host)
	if err != nil {
		return fmt.Errorf("host side %s of machine %s: %w", v.Host, v.Machine, err)
	}
	if err := netlink.LinkSetAlias(link, vethOwner+v.Machine); err != nil {
		return err
	}
	if err := addAddrs(netlink.AddrAdd, link, v.Addr.HostIPv4, v.Addr.HostIPv6); err != nil {
		return fmt.Errorf("addressing %s: %w", v.Host, err)
	}
	// Connections to a forwarded port on 127.0.0.1 leave through this link with a loopback
	// source, which the kernel drops unless told otherwise.
	if v.Addr.HostIPv4.IsValid() {
		if err := setRouteLocalnet(link.Attrs().Index); err != nil {
			return fmt.Errorf("route_localnet on %s: %w", v.Host, err)
		}
	}
	return netlink.LinkSetUp(link)
}

// ipv4DevconfRouteLocalnet is IPV4_DEVCONF_ROUTE_LOCALNET of linux/ip.h.
const ipv4DevconfRouteLocalnet = 26

// setRouteLocalnet sets net.ipv4.conf.<link>.route_localnet over netlink, which works where
// /proc/sys is mounted read-only (inside a container with the host's network, say); the netlink
// library has no call for it.
func setRouteLocalnet(index int) error {
	req := nl.NewNetlinkRequest(unix.RTM_SETLINK, unix.NLM_F_ACK)
	msg := nl.NewIfInfomsg(unix.AF_UNSPEC)
	msg.Index = int32(index)
	req.AddData(msg)
	spec := nl.NewRtAttr(unix.IFLA_AF_SPEC, nil)
	conf := spec.AddRtAttr(unix.AF_INET, nil).AddRtAttr(unix.IFLA_INET_CONF, nil)
	conf.AddRtAttr(ipv4DevconfRouteLocalnet, nl.Uint32Attr(1))
	req.AddData(spec)
	_, err := req.Execute(unix.NETLINK_ROUTE, 0)
	return err
}

// ConfigureGuest gives GuestInterface inside the machine whose leader is pid the guest's
// addresses and default routes through the host, and brings it and lo up.
func (v Veth) ConfigureGuest(pid int) error {
	ns, err := netns.GetFromPid(pid)
	if err != nil {
		return fmt.Errorf("network namespace of machine %s: %w", v.Machine, err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return err
	}
	defer h.Close()
	link, err := h.LinkByName(GuestInterface)
	if err != nil {
		return fmt.Errorf("%s in machine %s: %w", GuestInterface, v.Machine, err)
	}
	if err := addAddrs(h.AddrAdd, link, v.Addr.GuestIPv4, v.Addr.GuestIPv6); err != nil {
		return fmt.Errorf("addressing %s in machine %s: %w", GuestInterface, v.Machine, err)
	}
	if lo, err := h.LinkByName("lo"); err == nil {
		if err := h.LinkSetUp(lo); err != nil {
			return err
		}
	}
	if err := h.LinkSetUp(link); err != nil {
		return err
	}
	for _, gw := range []netip.Prefix{v.Addr.HostIPv4, v.Addr.HostIPv6} {
		if !gw.IsValid() {
			continue
		}
		route := &netlink.Route{LinkIndex: link.Attrs().Index, Gw: net.IP(gw.Addr().AsSlice())}
		if err := h.RouteAdd(route); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("default route via %s in machine %s: %w", gw.Addr(), v.Machine, err)
		}
	}
	return nil
}

// addAddrs adds the valid prefixes; IPv6 ones skip duplicate address detection, which would
// keep them unusable for a second or two on a link with nothing else on it. Configuring a link
// twice is harmless.
func addAddrs(add func(netlink.Link, *netlink.Addr) error, link netlink.Link, prefixes ...netip.Prefix) error {
	for _, p := range prefixes {
		if !p.IsValid() {
			continue
		}
		a := &netlink.Addr{IPNet: &net.IPNet{IP: net.IP(p.Addr().AsSlice()), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}}
		if p.Addr().Is6() {
			a.Flags = unix.IFA_F_NODAD
		}
		// Already there: the link was addressed before (a plugin restarted in between).
		if err := add(link, a); err != nil && !errors.Is(err, unix.EEXIST) {
			return err
		}
	}
	return nil
}

// DeleteVeth removes a host-side link by name; a link that is gone is no error.
func DeleteVeth(name string) error {
	link, err := netlink.LinkByName(name)
	var nf netlink.LinkNotFoundError
	if errors.As(err, &nf) {
		return nil
	}
	if err != nil {
		return err
	}
	if err := netlink.LinkDel(link); err != nil && !errors.Is(err, unix.ENODEV) {
		return err
	}
	return nil
}

// OwnedVeths lists the host-side links the driver made, by name, with their machines. The
// alias, not the name, proves a link is the driver's.
func OwnedVeths() (map[string]string, error) {
	links, err := netlink.LinkList()
	if err != nil {
		return nil, err
	}
	out := map[string]string{}
	for _, l := range links {
		a := l.Attrs()
		if machine, ok := strings.CutPrefix(a.Alias, vethOwner); ok && strings.HasPrefix(a.Name, vethHostPrefix) {
			out[a.Name] = machine
		}
	}
	return out, nil
}
