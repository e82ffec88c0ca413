// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

//go:build integration

package driver

import (
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/nomad/helper/uuid"
	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/shoenig/test/must"

	"github.com/nomad-nixos/nomad-driver-nixos/hostnet"
	"github.com/nomad-nixos/nomad-driver-nixos/nspawn"
)

// interfaces lists the network interfaces the guest sees.
func (td *testDriver) interfaces(t *testing.T, cfg *drivers.TaskConfig) []string {
	t.Helper()
	waitLog(t, cfg, "longrun: started", 2*time.Minute)
	res, err := td.ExecTask(cfg.ID, []string{"/bin/cat", "/proc/net/dev"}, 30*time.Second)
	must.NoError(t, err)
	must.Eq(t, 0, res.ExitResult.ExitCode, must.Sprint(string(res.Stderr)))
	var names []string
	for _, line := range strings.Split(string(res.Stdout), "\n") {
		if name, _, ok := strings.Cut(line, ":"); ok && !strings.Contains(name, "|") {
			names = append(names, strings.TrimSpace(name))
		}
	}
	slices.Sort(names)
	return names
}

func withNetwork(mode, bridge string) taskOpt {
	return func(_ *drivers.TaskConfig, tc *TaskConfig) { tc.NetworkMode, tc.HostBridge = mode, bridge }
}

func TestNetworkModes(t *testing.T) {
	dataDir := t.TempDir()
	td := newTestDriver(t, dataDir)
	before := inventory(t, dataDir)

	t.Run("veth by default", func(t *testing.T) {
		cfg := td.newTask(t, "veth", systemdToplevel(t), nil)
		td.start(t, cfg)
		must.Eq(t, []string{"eth0", "lo"}, td.interfaces(t, cfg))
		// Without a dns block, the host's resolvers.
		must.StrContains(t, td.guestExec(t, cfg, "/bin/cat", "/etc/resolv.conf"), "# From the host's ")
	})

	t.Run("none has loopback only", func(t *testing.T) {
		cfg := td.newTask(t, "nonet", systemdToplevel(t), nil, withNetwork("none", ""))
		td.start(t, cfg)
		must.Eq(t, []string{"lo"}, td.interfaces(t, cfg))
	})

	t.Run("host is refused unless the plugin config allows it", func(t *testing.T) {
		cfg := td.newTask(t, "hostnet", tinyToplevel(t), nil, withNetwork("host", ""))
		_, _, err := td.StartTask(cfg)
		must.ErrorContains(t, err, `network_mode = "host": the plugin config does not allow tasks on the host's network (allow_host_network = false)`)
	})

	t.Run("the task group's network namespace is refused where bridge mode cannot be used", func(t *testing.T) {
		// cni_path holds no CNI plugins; TestBridge (VM host) runs machines in such namespaces.
		nocni := newTestDriver(t, "", func(pc *PluginConfig) { pc.CNIPath = t.TempDir() })
		ns := "nxtest-" + uuid.Generate()[:8]
		run(t, "ip", "netns", "add", ns)
		t.Cleanup(func() { _ = exec.Command("ip", "netns", "delete", ns).Run() })
		cfg := nocni.newTask(t, "groupnet", systemdToplevel(t), nil)
		cfg.NetworkIsolation = &drivers.NetworkIsolationSpec{Mode: drivers.NetIsolationModeGroup, Path: "/var/run/netns/" + ns}
		_, _, err := nocni.StartTask(cfg)
		must.ErrorContains(t, err, "the task group's network namespace (bridge mode) cannot be used on this host: the CNI plugins bridge, firewall, host-local, loopback, portmap are not in cni_path")
	})

	t.Run("host_bridge", func(t *testing.T) {
		bridge := "nxbr" + uuid.Generate()[:6]
		run(t, "ip", "link", "add", bridge, "type", "bridge")
		t.Cleanup(func() { _ = exec.Command("ip", "link", "delete", bridge).Run() })
		cfg := td.newTask(t, "bridged", systemdToplevel(t), nil, withNetwork("veth", bridge))
		td.start(t, cfg)
		must.Eq(t, []string{"host0", "lo"}, td.interfaces(t, cfg))
		must.StrContains(t, run(t, "ip", "-o", "link", "show", "master", bridge), "vb-")

		for _, tc := range []struct{ bridge, want string }{
			{"lo", `host_bridge = "lo": no bridge of that name on this host`},
			{"no/such", `host_bridge = "no/such": must be a network interface name`},
			{"nxnosuchbr0", `host_bridge = "nxnosuchbr0": no bridge of that name on this host`},
		} {
			bad := td.newTask(t, "badbridge", tinyToplevel(t), nil, withNetwork("veth", tc.bridge))
			_, _, err := td.StartTask(bad)
			must.ErrorContains(t, err, tc.want)
		}
	})

	t.Run("host when allowed", func(t *testing.T) {
		allowed := newTestDriver(t, dataDir, func(c *PluginConfig) { c.AllowHostNetwork = true })
		cfg := allowed.newTask(t, "hostnet", systemdToplevel(t), nil, withNetwork("host", ""))
		allowed.start(t, cfg)
		var hostIfaces []string
		for _, line := range strings.Split(run(t, "ip", "-o", "link"), "\n") {
			if f := strings.Fields(line); len(f) > 1 {
				hostIfaces = append(hostIfaces, strings.SplitN(strings.TrimSuffix(f[1], ":"), "@", 2)[0])
			}
		}
		guest := allowed.interfaces(t, cfg)
		for _, name := range guest {
			must.SliceContains(t, hostIfaces, name, must.Sprintf("guest sees %v, host has %v", guest, hostIfaces))
		}
		must.Greater(t, 1, len(guest), must.Sprint(fmt.Sprint(guest)))
		must.NoError(t, allowed.DestroyTask(cfg.ID, true))
	})

	t.Cleanup(func() {
		must.SliceEmpty(t, leftovers(t, dataDir, before), must.Sprint(leftovers(t, dataDir, before)))
	})
}

// freePort is a TCP port nothing listens on now.
func freePort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	must.NoError(t, err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// get fetches url, retrying while the guest's web service starts.
func get(t *testing.T, url string) string {
	t.Helper()
	body, err := fetch(url, time.Minute)
	must.NoError(t, err, must.Sprintf("GET %s", url))
	return body
}

func (td *testDriver) guestExec(t *testing.T, cfg *drivers.TaskConfig, cmd ...string) string {
	t.Helper()
	res, err := td.ExecTask(cfg.ID, cmd, 30*time.Second)
	must.NoError(t, err)
	must.Eq(t, 0, res.ExitResult.ExitCode, must.Sprint(string(res.Stderr)))
	return string(res.Stdout)
}

// The driver addresses the machine's link itself, so StartTask returns the address at once; the
// guest's web service answers on it, and on forwarded ports of the host, loopback included.
func TestVethAddressAndPorts(t *testing.T) {
	dataDir := t.TempDir()
	td := newTestDriver(t, dataDir)
	before := inventory(t, dataDir)
	hostPort := freePort(t)
	cfg := td.newTask(t, "web", systemdToplevel(t), nil, withPorts(map[string][2]int{"http": {hostPort, 8080}}))
	cfg.DNS = &drivers.DNSConfig{Servers: []string{"10.0.0.53"}, Searches: []string{"service.consul"}, Options: []string{"ndots:2"}}
	handle, network, err := td.StartTask(cfg)
	must.NoError(t, err)
	must.NotNil(t, handle)
	t.Cleanup(func() { _ = td.d.DestroyTask(cfg.ID, true) })

	must.NotNil(t, network)
	guest4 := netip.MustParseAddr(network.IP)
	must.True(t, guest4.Is4())
	must.Eq(t, map[string]int{"http": 8080}, network.PortMap)
	veth := hostnet.NewVeth(machineOf(t, cfg), hostnet.Addressing{})

	// Exec needs the guest's systemd up.
	waitLog(t, cfg, "longrun: started", 2*time.Minute)
	addrs := td.guestExec(t, cfg, "/usr/sbin/ip", "-o", "addr", "show", "dev", "eth0")
	must.StrContains(t, addrs, "inet "+guest4.String()+"/30")
	v6 := regexp.MustCompile(`inet6 (fd35:[0-9a-f:]+)/126`).FindStringSubmatch(addrs)
	must.Len(t, 2, v6, must.Sprint(addrs))
	routes := td.guestExec(t, cfg, "/usr/sbin/ip", "route")
	must.StrContains(t, routes, "default via ")

	want := "Hello from task web"
	must.StrContains(t, get(t, fmt.Sprintf("http://%s:8080/", guest4)), want)
	must.StrContains(t, get(t, fmt.Sprintf("http://[%s]:8080/", v6[1])), want)
	// Forwarded: on loopback (which nspawn's --port cannot), on the host side of the link, and
	// over IPv6.
	must.StrContains(t, get(t, fmt.Sprintf("http://127.0.0.1:%d/", hostPort)), want)
	hostSide := strings.Fields(run(t, "ip", "-o", "-4", "addr", "show", "dev", veth.Host))[3]
	must.StrContains(t, get(t, fmt.Sprintf("http://%s:%d/", strings.Split(hostSide, "/")[0], hostPort)), want)
	hostSide6 := strings.Fields(run(t, "ip", "-o", "-6", "addr", "show", "dev", veth.Host, "scope", "global"))[3]
	must.StrContains(t, get(t, fmt.Sprintf("http://[%s]:%d/", strings.Split(hostSide6, "/")[0], hostPort)), want)

	resolv := td.guestExec(t, cfg, "/bin/cat", "/etc/resolv.conf")
	must.StrContains(t, resolv, "nameserver 10.0.0.53\nsearch service.consul\noptions ndots:2\n")

	must.NoError(t, td.StopTask(cfg.ID, 30*time.Second, ""))
	td.waitExit(t, cfg.ID, time.Minute)
	must.NoError(t, td.DestroyTask(cfg.ID, true))
	must.SliceEmpty(t, leftovers(t, dataDir, before), must.Sprint(leftovers(t, dataDir, before)))
	_, err = net.InterfaceByName(veth.Host)
	must.Error(t, err)
}

func TestPortErrors(t *testing.T) {
	dataDir := t.TempDir()
	td := newTestDriver(t, dataDir)
	before := inventory(t, dataDir)
	for _, tc := range []struct {
		name string
		opts []taskOpt
		want string
	}{
		{"unknown label", []taskOpt{withPorts(map[string][2]int{"http": {freePort(t), 80}}), withConfig(func(c *TaskConfig) { c.Ports = []string{"htp"} })},
			`ports[0] = "htp": the allocation has no port of that label (it has: http)`},
		{"no ports at all", []taskOpt{withConfig(func(c *TaskConfig) { c.Ports = []string{"http"} })},
			`ports[0] = "http": the allocation has no port of that label (it has: none)`},
		{"ports without veth", []taskOpt{withPorts(map[string][2]int{"http": {freePort(t), 80}}), withNetwork("none", "")},
			`ports = ["http"]: ports are forwarded only with network_mode = "veth" and no host_bridge`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := td.newTask(t, "ports", tinyToplevel(t), nil, tc.opts...)
			_, _, err := td.StartTask(cfg)
			must.ErrorContains(t, err, tc.want)
			must.SliceEmpty(t, leftovers(t, dataDir, before), must.Sprint(leftovers(t, dataDir, before)))
		})
	}
}

// nspawn killed outright: its namespace and the veth peer go with it, and destroying the task
// removes the host side and the port forwards.
func TestKilledNspawnLeavesNothing(t *testing.T) {
	dataDir := t.TempDir()
	td := newTestDriver(t, dataDir)
	before := inventory(t, dataDir)
	cfg := td.newTask(t, "killed", tinyToplevel(t), nil, withPorts(map[string][2]int{"http": {freePort(t), 80}}))
	td.start(t, cfg)
	waitLog(t, cfg, "tinyinit: ready", 30*time.Second)
	run(t, "systemctl", "kill", "--kill-whom=main", "--signal=SIGKILL", nspawn.UnitName(machineOf(t, cfg)))
	td.waitExit(t, cfg.ID, 30*time.Second)
	must.NoError(t, td.DestroyTask(cfg.ID, true))
	must.SliceEmpty(t, leftovers(t, dataDir, before), must.Sprint(leftovers(t, dataDir, before)))
}

// At plugin start, links and forwards of machines that are gone are removed; those of running
// machines and links that are not the driver's stay.
func TestNetworkReconciler(t *testing.T) {
	dataDir := t.TempDir()
	td := newTestDriver(t, dataDir)
	cfg := td.newTask(t, "alive", tinyToplevel(t), nil, withPorts(map[string][2]int{"http": {freePort(t), 80}}))
	td.start(t, cfg)
	alive := machineOf(t, cfg)

	gone := "nomad-deadbeef-gone"
	p, err := parsePools("10.235.255.248/29", "fd35:6e78:6f73:ffff::/120")
	must.NoError(t, err)
	orphan := hostnet.NewVeth(gone, p.addressing(0))
	run(t, "ip", "link", "add", orphan.Host, "type", "veth", "peer", "name", "vg-gone0")
	t.Cleanup(func() { _ = hostnet.DeleteVeth(orphan.Host) })
	must.NoError(t, orphan.ConfigureHost())
	must.NoError(t, hostnet.AddForwards(gone, p.list(), []hostnet.Forward{{Proto: "tcp", HostPort: uint16(freePort(t)), Guest: p.addressing(0).GuestIPv4.Addr(), GuestPort: 80}}))
	t.Cleanup(func() { _ = hostnet.RemoveForwards(gone) })
	foreign := "vn-notours0"
	run(t, "ip", "link", "add", foreign, "type", "veth", "peer", "name", "vg-notours0")
	t.Cleanup(func() { _ = exec.Command("ip", "link", "delete", foreign).Run() })

	newTestDriver(t, dataDir)
	_, err = net.InterfaceByName(orphan.Host)
	must.Error(t, err, must.Sprint("the orphan's link is removed"))
	forwarded, err := hostnet.ForwardedMachines()
	must.NoError(t, err)
	must.False(t, forwarded[gone])
	must.True(t, forwarded[alive])
	_, err = net.InterfaceByName(hostnet.NewVeth(alive, hostnet.Addressing{}).Host)
	must.NoError(t, err)
	_, err = net.InterfaceByName(foreign)
	must.NoError(t, err, must.Sprint("a link without the driver's mark is left alone"))
}
