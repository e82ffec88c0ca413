// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

//go:build integration

package driver

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/shoenig/test/must"
	"github.com/shoenig/test/wait"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/nomad-nixos/nomad-driver-nixos/nspawn"
)

// What only a host on the unified cgroup v2 hierarchy (with a kernel of its own, for the
// networking tests) can show. `make vm` runs these in a VM (e2e/vmhost) and sets
// NIXOS_NSPAWN_REQUIRE_CGROUP_V2, which turns the skip elsewhere into a failure.
func requireCgroupV2(t *testing.T) {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs("/sys/fs/cgroup", &st); err == nil && st.Type == unix.CGROUP2_SUPER_MAGIC {
		return
	}
	if os.Getenv("NIXOS_NSPAWN_REQUIRE_CGROUP_V2") != "" {
		t.Fatal("NIXOS_NSPAWN_REQUIRE_CGROUP_V2 is set, but /sys/fs/cgroup is not cgroup v2")
	}
	t.Skip("needs a host on cgroup v2; make vm runs it in one")
}

// unitCgroup is the directory of the machine's unit in the cgroup file system, as systemd says.
func unitCgroup(t *testing.T, cfg *drivers.TaskConfig) string {
	t.Helper()
	cg := strings.TrimSpace(run(t, "systemctl", "show", "-P", "ControlGroup", nspawn.UnitName(mustMachine(t, cfg))))
	must.StrHasPrefix(t, "/", cg)
	return filepath.Join("/sys/fs/cgroup", cg)
}

func cgValue(t *testing.T, dir, file string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, file))
	must.NoError(t, err)
	return strings.TrimSpace(string(b))
}

func cgUint(t *testing.T, dir, file string) uint64 {
	t.Helper()
	v, err := strconv.ParseUint(cgValue(t, dir, file), 10, 64)
	must.NoError(t, err, must.Sprintf("%s/%s", dir, file))
	return v
}

func cgKeys(t *testing.T, dir, file string) map[string]uint64 {
	t.Helper()
	out := map[string]uint64{}
	s := bufio.NewScanner(strings.NewReader(cgValue(t, dir, file)))
	for s.Scan() {
		if f := strings.Fields(s.Text()); len(f) == 2 {
			v, err := strconv.ParseUint(f[1], 10, 64)
			must.NoError(t, err)
			out[f[0]] = v
		}
	}
	return out
}

// Stats come from the unit's v2 files: each sample agrees with what the kernel's files say
// right after it was taken. A CPU quota set on the unit for the test makes cpu.stat count
// throttling.
func TestCgroupV2Stats(t *testing.T) {
	requireCgroupV2(t)
	td := newTestDriver(t, "")
	cfg := td.newTask(t, "v2stats", systemdToplevel(t), nil)
	td.start(t, cfg)
	waitLog(t, cfg, "longrun: started", 5*time.Minute)
	dir := unitCgroup(t, cfg)
	run(t, "systemctl", "set-property", "--runtime", nspawn.UnitName(mustMachine(t, cfg)), "CPUQuota=20%")
	must.Eq(t, "20000 100000", cgValue(t, dir, "cpu.max"))

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		_, _ = td.ExecTask(cfg.ID, []string{"/usr/bin/timeout", "60", "/bin/sh", "-c", "while :; do :; done"}, 90*time.Second)
	}()
	stats, err := td.TaskStats(ctx, cfg.ID, time.Second)
	must.NoError(t, err)
	deadline := time.After(90 * time.Second)
	var s *drivers.TaskResourceUsage
	for s == nil {
		select {
		case u := <-stats:
			must.NotNil(t, u)
			if c := u.ResourceUsage.CpuStats; c.Percent > 0 && c.UserMode > 0 && c.ThrottledPeriods > 0 {
				s = u
			}
		case <-deadline:
			t.Fatal("no sample with CPU use and throttling within 90s")
		}
	}
	mem, cpu := s.ResourceUsage.MemoryStats, s.ResourceUsage.CpuStats
	current := cgUint(t, dir, "memory.current")
	stat := cgKeys(t, dir, "memory.stat")
	peak := cgUint(t, dir, "memory.peak")
	cpuStat := cgKeys(t, dir, "cpu.stat")
	t.Logf("sample: memory %+v, cpu %+v", *mem, *cpu)
	t.Logf("files after it: memory.current %d, anon %d, file %d, memory.peak %d, cpu.stat %v", current, stat["anon"], stat["file"], peak, cpuStat)

	// Memory moves a little between the sample and the reading: within a quarter or 8 MiB.
	near := func(name string, got, want uint64) {
		t.Helper()
		diff := max(got, want) - min(got, want)
		must.True(t, got > 0 && diff <= max(want/4, 8<<20), must.Sprintf("%s: sample %d, kernel %d", name, got, want))
	}
	near("usage vs memory.current", mem.Usage, current)
	near("RSS vs memory.stat anon", mem.RSS, stat["anon"])
	near("cache vs memory.stat file", mem.Cache, stat["file"])
	must.SliceContains(t, mem.Measured, "Max Usage")
	must.Between(t, mem.Usage, mem.MaxUsage, peak)

	// Counters only grow: the sample is at most what the files say after it.
	must.SliceContainsAll(t, cpu.Measured, []string{"System Mode", "User Mode", "Total Ticks", "Throttled Periods", "Throttled Time", "Percent"})
	must.Between(t, 1, cpu.ThrottledPeriods, cpuStat["nr_throttled"])
	must.Between(t, 1, cpu.ThrottledTime, cpuStat["throttled_usec"]*1000)
	must.Positive(t, cpu.TotalTicks)
	must.Positive(t, cpuStat["user_usec"])
	// A 20% quota on a busy loop: the unit gets about a fifth of a CPU, never much more.
	must.Less(t, 60, cpu.Percent, must.Sprintf("percent %f", cpu.Percent))
}

// Nomad's resources reach the machine's cgroup files: memory_max as memory.max, memory as
// memory.low, no swap, cpu as cpu.weight, tasks_max as pids.max and reserved cores as its cpuset.
func TestCgroupV2Limits(t *testing.T) {
	requireCgroupV2(t)
	if runtime.NumCPU() < 2 {
		t.Fatalf("needs two CPUs to reserve one, has %d", runtime.NumCPU())
	}
	td := newTestDriver(t, "")
	cfg := td.newTask(t, "v2limits", tinyToplevel(t), nil, func(c *drivers.TaskConfig, _ *TaskConfig) {
		c.Resources.NomadResources.Memory.MemoryMB = 64
		c.Resources.NomadResources.Memory.MemoryMaxMB = 96
		c.Resources.NomadResources.Cpu.CpuShares = 500
		c.Resources.NomadResources.Cpu.ReservedCores = []uint16{1}
		c.Resources.LinuxResources.MemoryLimitBytes = 96 << 20
		c.Resources.LinuxResources.CPUShares = 500
		c.Resources.LinuxResources.CpusetCpus = "1"
		c.Resources.LinuxResources.CpusetCgroupPath = "/sys/fs/cgroup/nomad.slice/reserve.slice/" + c.AllocID + "-" + c.Name + ".scope"
	})
	td.start(t, cfg)
	waitLog(t, cfg, "tinyinit: ready", time.Minute)
	dir := unitCgroup(t, cfg)
	must.Eq(t, fmt.Sprint(96<<20), cgValue(t, dir, "memory.max"))
	must.Eq(t, fmt.Sprint(64<<20), cgValue(t, dir, "memory.low"))
	must.Eq(t, "0", cgValue(t, dir, "memory.swap.max"))
	must.Eq(t, fmt.Sprint(cpuWeight(500)), cgValue(t, dir, "cpu.weight"))
	must.Eq(t, fmt.Sprint(defaultTasksMax), cgValue(t, dir, "pids.max"))
	must.Eq(t, "1", cgValue(t, dir, "cpuset.cpus"))
	must.Eq(t, "1", cgValue(t, dir, "cpuset.cpus.effective"))
	// The guest's PID 1 may run on the reserved core only.
	leader, err := td.d.mgr.Leader(mustMachine(t, cfg))
	must.NoError(t, err)
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", leader))
	must.NoError(t, err)
	must.StrContains(t, string(status), "Cpus_allowed_list:\t1\n")
}

// systemd in the machine gets a delegated cgroup v2 subtree: it sees the controllers and sets
// limits on its own services, which land in the kernel's files below the machine's unit.
func TestCgroupV2GuestDelegation(t *testing.T) {
	requireCgroupV2(t)
	td := newTestDriver(t, "")
	cfg := td.newTask(t, "v2guest", systemdToplevel(t), nil)
	td.start(t, cfg)
	waitLog(t, cfg, "longrun: started", 5*time.Minute)
	guest := func(cmd string) string {
		t.Helper()
		res, err := td.ExecTask(cfg.ID, []string{"/bin/sh", "-c", cmd}, time.Minute)
		must.NoError(t, err)
		must.Eq(t, 0, res.ExitResult.ExitCode, must.Sprintf("%s: %s%s", cmd, res.Stdout, res.Stderr))
		return strings.TrimSpace(string(res.Stdout))
	}
	must.Eq(t, "0::/init.scope", guest("cat /proc/1/cgroup"))
	controllers := strings.Fields(guest("cat /sys/fs/cgroup/cgroup.controllers"))
	must.SliceContainsSubset(t, controllers, []string{"cpu", "memory", "pids"})

	guest("systemctl set-property --runtime longrun.service MemoryMax=48M TasksMax=7")
	must.Eq(t, fmt.Sprint(48<<20), guest("cat /sys/fs/cgroup/system.slice/longrun.service/memory.max"))
	var found []string
	must.NoError(t, filepath.WalkDir(unitCgroup(t, cfg), func(p string, e os.DirEntry, err error) error {
		if err == nil && e.IsDir() && e.Name() == "longrun.service" {
			found = append(found, p)
		}
		return err
	}))
	must.SliceLen(t, 1, found, must.Sprint(found))
	must.Eq(t, fmt.Sprint(48<<20), cgValue(t, found[0], "memory.max"))
	must.Eq(t, "7", cgValue(t, found[0], "pids.max"))
}

// A machine's own outbound traffic, IPv4 and IPv6, is masqueraded behind the host's address and
// reaches a server in another network namespace over a routed (forwarded) link. On the build
// machine forwarding is off; the VM has a network stack of its own to turn it on.
func TestOutboundMasquerade(t *testing.T) {
	requireCgroupV2(t)
	for _, key := range []string{"net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding"} {
		path := "/proc/sys/" + key
		old, err := os.ReadFile(path)
		must.NoError(t, err)
		must.NoError(t, os.WriteFile(path, []byte("1"), 0o644))
		t.Cleanup(func() { _ = os.WriteFile(path, old, 0o644) })
	}
	const ns = "nxvm-outside"
	run(t, "ip", "netns", "add", ns)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	run(t, "ip", "link", "add", "vmo-host", "type", "veth", "peer", "name", "vmo-peer", "netns", ns)
	t.Cleanup(func() { _ = exec.Command("ip", "link", "del", "vmo-host").Run() })
	run(t, "ip", "addr", "add", "192.0.2.1/24", "dev", "vmo-host")
	run(t, "ip", "addr", "add", "2001:db8:7::1/64", "dev", "vmo-host", "nodad")
	run(t, "ip", "link", "set", "vmo-host", "up")
	run(t, "ip", "-n", ns, "addr", "add", "192.0.2.2/24", "dev", "vmo-peer")
	run(t, "ip", "-n", ns, "addr", "add", "2001:db8:7::2/64", "dev", "vmo-peer", "nodad")
	run(t, "ip", "-n", ns, "link", "set", "vmo-peer", "up")
	run(t, "ip", "-n", ns, "link", "set", "lo", "up")
	srv := serveInNetns(t, ns)
	t.Cleanup(func() { _ = srv.Close() })

	td := newTestDriver(t, "")
	cfg := td.newTask(t, "v2out", systemdToplevel(t), nil)
	td.start(t, cfg)
	waitLog(t, cfg, "longrun: started", 5*time.Minute)
	// Debian's bash in the guest speaks HTTP over /dev/tcp.
	get := func(server string) (*drivers.ExecTaskResult, error) {
		cmd := fmt.Sprintf(`exec 3<>/dev/tcp/%s/8080 && printf 'GET / HTTP/1.0\r\n\r\n' >&3 && timeout 10 cat <&3`, server)
		return td.ExecTask(cfg.ID, []string{"/usr/bin/timeout", "15", "/bin/bash", "-c", cmd}, time.Minute)
	}
	reaches := func(t *testing.T) {
		for server, want := range map[string]string{
			"192.0.2.2":     "from 192.0.2.1:",
			"2001:db8:7::2": "from [2001:db8:7::1]:",
		} {
			res, err := get(server)
			must.NoError(t, err)
			must.Eq(t, 0, res.ExitResult.ExitCode, must.Sprintf("%s: %s%s", server, res.Stdout, res.Stderr))
			must.StrContains(t, string(res.Stdout), "\r\n\r\n"+want, must.Sprintf("%s answered %q", server, res.Stdout))
		}
	}
	t.Run("masqueraded, IPv4 and IPv6", reaches)

	// README, "Networking": a host firewall that filters forwarded traffic must let it through
	// to the machines' vn-* links.
	const fw = "nxvm_firewall"
	run(t, "nft", "add table inet "+fw+"; add chain inet "+fw+" forward { type filter hook forward priority filter; policy drop; }")
	t.Cleanup(func() { _ = exec.Command("nft", "delete", "table", "inet", fw).Run() })
	t.Run("a forward policy of drop stops it", func(t *testing.T) {
		for _, server := range []string{"192.0.2.2", "2001:db8:7::2"} {
			res, err := get(server)
			must.NoError(t, err)
			must.NotEq(t, 0, res.ExitResult.ExitCode, must.Sprintf("%s answered %q through a dropping firewall", server, res.Stdout))
		}
	})
	run(t, "nft", `add rule inet `+fw+` forward iifname "vn-*" accept; add rule inet `+fw+` forward oifname "vn-*" ct state established,related accept`)
	t.Run("and accepting the vn-* links lets it through", reaches)
}

// serveInNetns answers HTTP on port 8080 (IPv4 and IPv6) in network namespace ns with the
// address the request came from.
func serveInNetns(t *testing.T, ns string) *http.Server {
	t.Helper()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	origin, err := netns.Get()
	must.NoError(t, err)
	defer origin.Close()
	target, err := netns.GetFromName(ns)
	must.NoError(t, err)
	defer target.Close()
	must.NoError(t, netns.Set(target))
	l, lerr := net.Listen("tcp", ":8080")
	must.NoError(t, netns.Set(origin))
	must.NoError(t, lerr)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "from %s\n", r.RemoteAddr)
	})}
	go func() { _ = srv.Serve(l) }()
	return srv
}

// The fingerprint names the cgroup mode and the systemd version it found.
func TestCgroupV2Fingerprint(t *testing.T) {
	requireCgroupV2(t)
	fp := firstFingerprint(t, newTestDriver(t, ""))
	must.Eq(t, drivers.HealthStateHealthy, fp.Health, must.Sprint(fp.HealthDescription))
	mode, _ := fp.Attributes[attrPrefix+"cgroup_mode"].GetString()
	must.EqOp(t, "v2", mode)
	version, _ := fp.Attributes[attrPrefix+"systemd_version"].GetString()
	fields := strings.Fields(run(t, "systemctl", "--version"))
	must.SliceLen(t, 3, fields[:3])
	must.StrHasPrefix(t, fields[1], version, must.Sprintf("systemctl --version: %v", fields[:3]))
	must.EqOp(t, "", systemdProblem(version))
}

// A machine on Nomad's shared cores follows the share partition's cpuset as other tasks reserve
// cores and give them back. Nomad's partition is played by cgroups this test makes, written as
// Nomad's client writes nomad.slice/share.slice.
func TestCgroupV2SharedCoresFollowNomad(t *testing.T) {
	requireCgroupV2(t)
	if runtime.NumCPU() < 2 {
		t.Fatalf("needs two CPUs to reserve one, has %d", runtime.NumCPU())
	}
	root := "/sys/fs/cgroup/nxvm-nomad"
	share := filepath.Join(root, "share")
	scope := filepath.Join(share, "task")
	write := func(file, v string) {
		t.Helper()
		must.NoError(t, os.WriteFile(file, []byte(v), 0o644), must.Sprint(file))
	}
	write("/sys/fs/cgroup/cgroup.subtree_control", "+cpuset")
	for _, d := range []string{root, share, scope} {
		must.NoError(t, os.Mkdir(d, 0o755))
	}
	t.Cleanup(func() {
		for _, d := range []string{scope, share, root} {
			_ = os.Remove(d)
		}
	})
	write(filepath.Join(root, "cgroup.subtree_control"), "+cpuset")
	write(filepath.Join(share, "cgroup.subtree_control"), "+cpuset")
	all := cgValue(t, "/sys/fs/cgroup", "cpuset.cpus.effective")
	write(filepath.Join(share, "cpuset.cpus"), all)

	td := newTestDriver(t, "")
	cfg := td.newTask(t, "shared", tinyToplevel(t), nil, func(c *drivers.TaskConfig, _ *TaskConfig) {
		c.Resources.LinuxResources.CpusetCgroupPath = scope
	})
	td.start(t, cfg)
	waitLog(t, cfg, "tinyinit: ready", time.Minute)
	dir := unitCgroup(t, cfg)
	leader, err := td.d.mgr.Leader(mustMachine(t, cfg))
	must.NoError(t, err)
	follows := func(cpus string) {
		t.Helper()
		must.Wait(t, wait.InitialSuccess(
			wait.BoolFunc(func() bool {
				status, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", leader))
				return cgValue(t, dir, "cpuset.cpus") == cpus &&
					strings.Contains(string(status), "Cpus_allowed_list:\t"+cpus+"\n")
			}),
			wait.Timeout(scaled(30*time.Second)), wait.Gap(200*time.Millisecond),
		), must.Sprintf("the machine's cpuset is %q, not %q", cgValue(t, dir, "cpuset.cpus"), cpus))
	}
	follows(all)
	// Another task reserves core 1: Nomad shrinks the share partition.
	write(filepath.Join(share, "cpuset.cpus"), "0")
	follows("0")
	// And gives it back.
	write(filepath.Join(share, "cpuset.cpus"), all)
	follows(all)
}
