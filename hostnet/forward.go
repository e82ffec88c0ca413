// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package hostnet

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"
)

// Ports reach machines through DNAT rules in an nftables table of the driver's own, for IPv4 and
// IPv6 and on every local address, loopback included (nspawn's --port does IPv4 only and not
// on loopback). Each rule's comment names its machine, so the rules of a machine can be found,
// removed, and told apart from anything else on the host.

// natTable is the driver's nftables table (family inet).
const natTable = "nomad_driver_nixos"

// Forward is a host port forwarded to a machine's port.
type Forward struct {
	// Proto is "tcp" or "udp".
	Proto     string
	HostPort  uint16
	Guest     netip.Addr
	GuestPort uint16
}

type natChains struct {
	table                        *nftables.Table
	prerouting, output, postrout *nftables.Chain
}

func natTableRef() *nftables.Table {
	return &nftables.Table{Family: nftables.TableFamilyINet, Name: natTable}
}

// ensureNAT adds the table and its chains (a no-op when they exist) and, for new chains, the
// masquerading that lets loopback clients and the machines' own traffic out.
func ensureNAT(c *nftables.Conn, pools []netip.Prefix) (*natChains, error) {
	existing, err := c.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		return nil, err
	}
	have := map[string]bool{}
	for _, ch := range existing {
		if ch.Table.Name == natTable {
			have[ch.Name] = true
		}
	}
	t := c.AddTable(natTableRef())
	n := &natChains{table: t}
	nat := nftables.ChainTypeNAT
	n.prerouting = c.AddChain(&nftables.Chain{Name: "prerouting", Table: t, Type: nat, Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityNATDest})
	n.output = c.AddChain(&nftables.Chain{Name: "output", Table: t, Type: nat, Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityNATDest})
	n.postrout = c.AddChain(&nftables.Chain{Name: "postrouting", Table: t, Type: nat, Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource})
	if !have["postrouting"] {
		// A client on 127.0.0.1 whose connection was sent to a machine: the machine cannot
		// answer a loopback address.
		c.AddRule(&nftables.Rule{Table: t, Chain: n.postrout, Exprs: concat(
			matchFamily(unix.NFPROTO_IPV4), matchOifPrefix(vethHostPrefix),
			matchSource(netip.MustParsePrefix("127.0.0.0/8")), []expr.Any{&expr.Masq{}})})
		// The machines' traffic to anywhere but another machine leaves with the host's address.
		for _, p := range pools {
			fam := byte(unix.NFPROTO_IPV4)
			if p.Addr().Is6() {
				fam = unix.NFPROTO_IPV6
			}
			c.AddRule(&nftables.Rule{Table: t, Chain: n.postrout, Exprs: concat(
				matchFamily(fam), matchSource(p), notOifPrefix(vethHostPrefix), []expr.Any{&expr.Masq{}})})
		}
	}
	return n, nil
}

// AddForwards installs the port forwards of a machine, and the table they live in with its
// masquerading for pools.
func AddForwards(machine string, pools []netip.Prefix, fwds []Forward) error {
	c, err := nftables.New()
	if err != nil {
		return err
	}
	n, err := ensureNAT(c, pools)
	if err != nil {
		return err
	}
	tag := userdata.AppendString(nil, userdata.TypeComment, vethOwner+machine)
	for _, f := range fwds {
		proto := byte(unix.IPPROTO_TCP)
		if f.Proto == "udp" {
			proto = unix.IPPROTO_UDP
		}
		fam, natFam := byte(unix.NFPROTO_IPV4), uint32(unix.NFPROTO_IPV4)
		if f.Guest.Is6() {
			fam, natFam = unix.NFPROTO_IPV6, unix.NFPROTO_IPV6
		}
		exprs := concat(matchFamily(fam), matchL4(proto), matchDport(f.HostPort), matchLocalDest(), []expr.Any{
			&expr.Immediate{Register: 1, Data: f.Guest.AsSlice()},
			&expr.Immediate{Register: 2, Data: binaryutil.BigEndian.PutUint16(f.GuestPort)},
			&expr.NAT{Type: expr.NATTypeDestNAT, Family: natFam, RegAddrMin: 1, RegProtoMin: 2, Specified: true},
		})
		for _, ch := range []*nftables.Chain{n.prerouting, n.output} {
			c.AddRule(&nftables.Rule{Table: n.table, Chain: ch, Exprs: exprs, UserData: tag})
		}
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("adding the port forwards of machine %s: %w", machine, err)
	}
	return nil
}

// RemoveForwards deletes every rule of the machine; with no table, there is nothing to delete.
func RemoveForwards(machine string) error {
	rules, c, err := ownedRules()
	if err != nil || c == nil {
		return err
	}
	n := 0
	for _, r := range rules {
		if r.machine == machine {
			if err := c.DelRule(r.rule); err != nil {
				return err
			}
			n++
		}
	}
	if n == 0 {
		return nil
	}
	return c.Flush()
}

// ForwardedMachines lists the machines that have port forwards.
func ForwardedMachines() (map[string]bool, error) {
	rules, _, err := ownedRules()
	if err != nil {
		return nil, err
	}
	out := map[string]bool{}
	for _, r := range rules {
		out[r.machine] = true
	}
	return out, nil
}

type ownedRule struct {
	machine string
	rule    *nftables.Rule
}

func ownedRules() ([]ownedRule, *nftables.Conn, error) {
	c, err := nftables.New()
	if err != nil {
		return nil, nil, err
	}
	t, err := c.ListTableOfFamily(natTable, nftables.TableFamilyINet)
	if err != nil {
		// No table: no rules.
		return nil, nil, nil
	}
	var out []ownedRule
	for _, name := range []string{"prerouting", "output"} {
		rules, err := c.GetRules(t, &nftables.Chain{Name: name, Table: t})
		if err != nil {
			return nil, nil, err
		}
		for _, r := range rules {
			comment, _ := userdata.GetString(r.UserData, userdata.TypeComment)
			if m, ok := strings.CutPrefix(comment, vethOwner); ok {
				out = append(out, ownedRule{m, r})
			}
		}
	}
	return out, c, nil
}

func concat(parts ...[]expr.Any) []expr.Any {
	var out []expr.Any
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

func matchFamily(fam byte) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{fam}},
	}
}

func matchL4(proto byte) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
	}
}

func matchDport(port uint16) []expr.Any {
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(port)},
	}
}

// matchLocalDest matches packets addressed to any address of the host.
func matchLocalDest() []expr.Any {
	return []expr.Any{
		&expr.Fib{Register: 1, FlagDADDR: true, ResultADDRTYPE: true},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(unix.RTN_LOCAL)},
	}
}

// matchSource matches the source address against p.
func matchSource(p netip.Prefix) []expr.Any {
	off, size := uint32(12), uint32(4)
	if p.Addr().Is6() {
		off, size = 8, 16
	}
	mask := make([]byte, size)
	for i := 0; i < p.Bits(); i++ {
		mask[i/8] |= 0x80 >> (i % 8)
	}
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: size},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: size, Mask: mask, Xor: make([]byte, size)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: p.Masked().Addr().AsSlice()},
	}
}

func matchOifPrefix(prefix string) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte(prefix)},
	}
}

func notOifPrefix(prefix string) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte(prefix)},
	}
}
