// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package driver

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"math/big"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/hashicorp/nomad/plugins/drivers"

	"github.com/nomad-nixos/nomad-driver-nixos/hostnet"
	"github.com/nomad-nixos/nomad-driver-nixos/nspawn"
)

const (
	defaultAddressPool     = "10.235.0.0/16"
	defaultAddressPoolIPv6 = "fd35:6e78:6f73::/48"
)

// machineNetwork decides how the machine is connected.
func machineNetwork(cfg *drivers.TaskConfig, tc *TaskConfig, o taskOptions, pc PluginConfig, machine string) (nspawn.Network, error) {
	if o.networkMode == nspawn.NetworkGroup {
		return groupSpec(cfg.NetworkIsolation), nil
	}
	n := nspawn.Network{Mode: o.networkMode, Bridge: tc.HostBridge}
	if n.Mode == nspawn.NetworkHost && !pc.AllowHostNetwork {
		return n, fmt.Errorf("network_mode = %q: the plugin config does not allow tasks on the host's network (allow_host_network = false)", n.Mode)
	}
	if n.Bridge != "" {
		if fi, err := os.Stat(filepath.Join("/sys/class/net", n.Bridge, "bridge")); err != nil || !fi.IsDir() {
			return n, fmt.Errorf("host_bridge = %q: no bridge of that name on this host", n.Bridge)
		}
	}
	if len(tc.Ports) > 0 && (n.Mode != nspawn.NetworkVeth || n.Bridge != "") {
		return n, fmt.Errorf("ports = %q: ports are forwarded only with network_mode = %q and no host_bridge", tc.Ports, nspawn.NetworkVeth)
	}
	if n.Mode == nspawn.NetworkVeth && n.Bridge == "" {
		n.VethHost, n.VethGuest = hostnet.NewVeth(machine, hostnet.Addressing{}).Host, hostnet.GuestInterface
	}
	return n, nil
}

// pools are the address pools of the plugin config; a family left empty is not used.
type pools struct {
	v4, v6 netip.Prefix
}

func parsePools(v4, v6 string) (pools, error) {
	var p pools
	var err error
	if v4 != "" {
		if p.v4, err = netip.ParsePrefix(v4); err != nil || !p.v4.Addr().Is4() || p.v4.Bits() > 29 || p.v4 != p.v4.Masked() {
			return p, fmt.Errorf("address_pool = %q: must be an IPv4 network such as %q, /29 or larger, without host bits", v4, defaultAddressPool)
		}
	}
	if v6 != "" {
		if p.v6, err = netip.ParsePrefix(v6); err != nil || !p.v6.Addr().Is6() || p.v6.Addr().Is4In6() || p.v6.Bits() > 125 || p.v6 != p.v6.Masked() {
			return p, fmt.Errorf("address_pool_ipv6 = %q: must be an IPv6 network such as %q, /125 or larger, without host bits", v6, defaultAddressPoolIPv6)
		}
	}
	if !p.v4.IsValid() && !p.v6.IsValid() {
		return p, errors.New(`address_pool and address_pool_ipv6 are both empty: veth machines need at least one`)
	}
	return p, nil
}

func (p pools) list() []netip.Prefix {
	var out []netip.Prefix
	for _, q := range []netip.Prefix{p.v4, p.v6} {
		if q.IsValid() {
			out = append(out, q)
		}
	}
	return out
}

// slots is how many machines the pools can address: each takes a block of four addresses.
func (p pools) slots() int {
	n := 1 << 30
	for _, q := range p.list() {
		if bits := q.Addr().BitLen() - q.Bits() - 2; bits < 30 {
			n = min(n, 1<<bits)
		}
	}
	return n
}

// addressing is the link of slot i: the block's first address for the host, second for the guest.
func (p pools) addressing(i int) hostnet.Addressing {
	var a hostnet.Addressing
	block := func(q netip.Prefix, k int) netip.Prefix {
		return netip.PrefixFrom(offset(q.Addr(), uint64(i)*4+uint64(k)), q.Addr().BitLen()-2)
	}
	if p.v4.IsValid() {
		a.HostIPv4, a.GuestIPv4 = block(p.v4, 1), block(p.v4, 2)
	}
	if p.v6.IsValid() {
		a.HostIPv6, a.GuestIPv6 = block(p.v6, 1), block(p.v6, 2)
	}
	return a
}

func offset(a netip.Addr, n uint64) netip.Addr {
	v := new(big.Int).SetBytes(a.AsSlice())
	v.Add(v, new(big.Int).SetUint64(n))
	b := make([]byte, a.BitLen()/8)
	v.FillBytes(b)
	out, _ := netip.AddrFromSlice(b)
	return out
}

// allocateAddress gives the machine the lowest free slot of the pools and records it in its
// machine directory, where the directory's removal frees it.
func (d *Driver) allocateAddress(m *machine, p pools) (hostnet.Addressing, error) {
	d.addrMu.Lock()
	defer d.addrMu.Unlock()
	used := map[int]bool{}
	parent := filepath.Dir(m.dir)
	dirs, _ := os.ReadDir(parent)
	for _, e := range dirs {
		other := machine{dir: filepath.Join(parent, e.Name())}
		if b, err := os.ReadFile(other.addressFile()); err == nil {
			if i, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
				used[i] = true
			}
		}
	}
	for i := 0; i < p.slots(); i++ {
		if used[i] {
			continue
		}
		if err := os.MkdirAll(m.dir, 0o700); err != nil {
			return hostnet.Addressing{}, err
		}
		if err := os.WriteFile(m.addressFile(), []byte(strconv.Itoa(i)), 0o600); err != nil {
			return hostnet.Addressing{}, err
		}
		return p.addressing(i), nil
	}
	return hostnet.Addressing{}, fmt.Errorf("the address pools (%v) are used up by %d machines", p.list(), len(used))
}

// forwards are the port forwards the task's ports list asks for, to the guest's addresses.
func forwards(cfg *drivers.TaskConfig, labels []string, a hostnet.Addressing) ([]hostnet.Forward, map[string]int, error) {
	var have []string
	byLabel := map[string][2]int{}
	if cfg.Resources != nil && cfg.Resources.Ports != nil {
		for _, p := range *cfg.Resources.Ports {
			have = append(have, p.Label)
			to := p.To
			if to <= 0 {
				to = p.Value
			}
			byLabel[p.Label] = [2]int{p.Value, to}
		}
	}
	var out []hostnet.Forward
	portMap := map[string]int{}
	for i, l := range labels {
		p, ok := byLabel[l]
		if !ok {
			if len(have) == 0 {
				have = []string{"none"}
			}
			return nil, nil, fmt.Errorf("ports[%d] = %q: the allocation has no port of that label (it has: %s); declare it in the group's network block", i, l, strings.Join(have, ", "))
		}
		portMap[l] = p[1]
		for _, guest := range []netip.Prefix{a.GuestIPv4, a.GuestIPv6} {
			if !guest.IsValid() {
				continue
			}
			for _, proto := range []string{"tcp", "udp"} {
				out = append(out, hostnet.Forward{Proto: proto, HostPort: uint16(p[0]), Guest: guest.Addr(), GuestPort: uint16(p[1])})
			}
		}
	}
	return out, portMap, nil
}

// driverNetwork is what Nomad learns of the machine's network: its address, for services with
// address_mode = "driver", and the ports inside it.
func driverNetwork(a hostnet.Addressing, portMap map[string]int) *drivers.DriverNetwork {
	ip := a.GuestIPv4
	if !ip.IsValid() {
		ip = a.GuestIPv6
	}
	return &drivers.DriverNetwork{IP: ip.Addr().String(), PortMap: portMap}
}

// resolvConf is the machine's /etc/resolv.conf: Nomad's dns block if the task has one, else the
// host's resolvers. A NixOS guest picks up a pre-seeded resolv.conf (useHostResolvConf).
func resolvConf(dns *drivers.DNSConfig, mode string) []byte {
	var b bytes.Buffer
	if dns != nil && (len(dns.Servers) > 0 || len(dns.Searches) > 0 || len(dns.Options) > 0) {
		b.WriteString("# From the Nomad task's dns block (nomad-driver-nixos).\n")
		for _, s := range dns.Servers {
			fmt.Fprintf(&b, "nameserver %s\n", s)
		}
		if len(dns.Searches) > 0 {
			fmt.Fprintf(&b, "search %s\n", strings.Join(dns.Searches, " "))
		}
		if len(dns.Options) > 0 {
			fmt.Fprintf(&b, "options %s\n", strings.Join(dns.Options, " "))
		}
		return b.Bytes()
	}
	// systemd-resolved's list of upstream servers, when it runs: its stub on 127.0.0.53 is the
	// host's own loopback.
	src := "/run/systemd/resolve/resolv.conf"
	host, err := os.ReadFile(src)
	if err != nil {
		src = "/etc/resolv.conf"
		host, _ = os.ReadFile(src)
	}
	fmt.Fprintf(&b, "# From the host's %s (nomad-driver-nixos).\n", src)
	sc := bufio.NewScanner(bytes.NewReader(host))
	for sc.Scan() {
		line := sc.Text()
		f := strings.Fields(line)
		// A loopback resolver of the host is out of reach from the machine's own network.
		if len(f) >= 2 && f[0] == "nameserver" && mode != nspawn.NetworkHost {
			if a, err := netip.ParseAddr(f[1]); err == nil && a.IsLoopback() {
				continue
			}
		}
		b.WriteString(line + "\n")
	}
	return b.Bytes()
}

// reconcileNetwork removes the veth links and port forwards of machines that no longer exist:
// left behind when nspawn or the plugin died at the wrong moment. Only links and rules marked
// as the driver's are touched, and only when neither their machine nor its unit is there.
func (d *Driver) reconcileNetwork(ctx context.Context) {
	gone := func(machine string) bool {
		if ok, _ := d.mgr.Registered(machine); ok {
			return false
		}
		st, err := d.mgr.Status(ctx, nspawn.UnitName(machine))
		return err == nil && !st.Loaded()
	}
	links, err := hostnet.OwnedVeths()
	if err != nil {
		d.logger.Warn("listing veth links", "error", err)
	}
	for name, machine := range links {
		if gone(machine) {
			d.logger.Info("removing the veth link of a machine that is gone", "link", name, "machine", machine)
			if err := hostnet.DeleteVeth(name); err != nil {
				d.logger.Warn("removing veth link", "link", name, "error", err)
			}
		}
	}
	machines, err := hostnet.ForwardedMachines()
	if err != nil {
		d.logger.Warn("listing port forwards", "error", err)
	}
	for _, machine := range slices.Sorted(maps.Keys(machines)) {
		if gone(machine) {
			d.logger.Info("removing the port forwards of a machine that is gone", "machine", machine)
			if err := hostnet.RemoveForwards(machine); err != nil {
				d.logger.Warn("removing port forwards", "machine", machine, "error", err)
			}
		}
	}
}
