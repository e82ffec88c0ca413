// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

//go:build integration

package driver

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/shoenig/test/must"
	"github.com/shoenig/test/wait"

	"github.com/nomad-nixos/nomad-driver-nixos/nspawn"
)

// Nomad's bridge mode needs the CNI plugins and makes a bridge and iptables rules in the host's
// network namespace: these tests run only where that namespace is the tests' own (make vm, the VM
// host), never on the build machine.

// cniPath is where Debian's containernetworking-plugins puts the CNI plugins.
const cniPath = "/usr/lib/cni"

// nomadAgent is a real Nomad agent, server and client in one, with a data directory that
// outlives a restart of the agent (a -dev agent forgets its jobs).
type nomadAgent struct {
	t         testing.TB
	bin       string
	dir       string
	pluginDir string
	cmd       *exec.Cmd
	logf      *os.File
	// driverCNIPath is the plugin config's cni_path.
	driverCNIPath string
}

func newNomadAgent(t testing.TB) *nomadAgent {
	nomad, plugin := os.Getenv("NIXOS_NSPAWN_NOMAD"), os.Getenv("NIXOS_NSPAWN_PLUGIN")
	if nomad == "" || plugin == "" {
		t.Fatal("NIXOS_NSPAWN_NOMAD and NIXOS_NSPAWN_PLUGIN must name the agent and the plugin binary: run through make vm")
	}
	if _, err := os.Stat(filepath.Join(cniPath, "bridge")); err != nil {
		t.Fatalf("no CNI bridge plugin in %s (Debian's containernetworking-plugins): %v", cniPath, err)
	}
	dir := t.TempDir()
	a := &nomadAgent{t: t, bin: nomad, dir: dir, pluginDir: filepath.Join(dir, "plugins"), driverCNIPath: cniPath}
	must.NoError(t, os.Mkdir(a.pluginDir, 0o755))
	must.NoError(t, os.Symlink(plugin, filepath.Join(a.pluginDir, "nomad-driver-nixos")))
	logf, err := os.Create(filepath.Join(dir, "agent.log"))
	must.NoError(t, err)
	a.logf = logf
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(logf.Name())
			if len(b) > 64<<10 {
				b = b[len(b)-64<<10:]
			}
			t.Logf("agent log (end):\n%s", b)
		}
	})
	a.start()
	return a
}

func (a *nomadAgent) config() string {
	return fmt.Sprintf(`
data_dir  = %q
bind_addr = "127.0.0.1"
advertise {
  http = "127.0.0.1"
  rpc  = "127.0.0.1"
  serf = "127.0.0.1"
}
log_level = "DEBUG"
server {
  enabled          = true
  bootstrap_expect = 1
}
client {
  enabled           = true
  cni_path          = %q
  network_interface = "eth0"
}
plugin "nomad-driver-nixos" {
  config {
    data_dir = %q
    cni_path = %q
  }
}
plugin "raw_exec" {
  config {
    enabled = true
  }
}
`, filepath.Join(a.dir, "nomad"), cniPath, a.dataDir(), a.driverCNIPath)
}

func (a *nomadAgent) dataDir() string { return filepath.Join(a.dir, "driver") }

// start runs the agent and waits for its node to be ready with a healthy nixos-nspawn driver.
func (a *nomadAgent) start() {
	t := a.t
	config := filepath.Join(a.dir, "agent.hcl")
	must.NoError(t, os.WriteFile(config, []byte(a.config()), 0o644))
	a.cmd = exec.Command(a.bin, "agent", "-plugin-dir="+a.pluginDir, "-config="+config)
	a.cmd.Stdout, a.cmd.Stderr = a.logf, a.logf
	must.NoError(t, a.cmd.Start())
	t.Cleanup(a.stop)
	must.Wait(t, wait.InitialSuccess(
		wait.BoolFunc(func() bool {
			var nodes []struct {
				Status  string
				Drivers map[string]struct{ Healthy bool }
			}
			return a.api("/v1/nodes", &nodes) == nil && len(nodes) == 1 && nodes[0].Status == "ready" && nodes[0].Drivers["nixos-nspawn"].Healthy
		}),
		wait.Timeout(scaled(time.Minute)), wait.Gap(time.Second),
	), must.Sprint("the agent's node never became ready with a healthy nixos-nspawn driver"))
}

// stop ends the agent as an operator does; its client leaves the tasks running.
func (a *nomadAgent) stop() {
	if a.cmd == nil {
		return
	}
	_ = a.cmd.Process.Signal(os.Interrupt)
	_ = a.cmd.Wait()
	a.cmd = nil
}

func (a *nomadAgent) api(path string, v any) error {
	resp, err := http.Get("http://127.0.0.1:4646" + path)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		return fmt.Errorf("GET %s: %s: %s", path, resp.Status, b)
	}
	return json.NewDecoder(resp.Body).Decode(v)
}

func (a *nomadAgent) nomad(args ...string) (string, error) {
	out, err := exec.Command(a.bin, args...).CombinedOutput()
	return string(out), err
}

// runJob registers a job of e2e/jobs with its variables, without waiting for it.
func (a *nomadAgent) runJob(file string, vars ...string) {
	args := []string{"job", "run", "-detach"}
	for _, v := range vars {
		args = append(args, "-var", v)
	}
	out, err := a.nomad(append(args, "../e2e/jobs/"+file)...)
	must.NoError(a.t, err, must.Sprint(out))
}

// stopJob stops and purges a job and waits until its allocations' machines are gone.
func (a *nomadAgent) stopJob(job string) {
	allocs := a.allocs(job)
	out, err := a.nomad("job", "stop", "-purge", job)
	must.NoError(a.t, err, must.Sprint(out))
	// Until nothing names the allocations: the machine leaves machinectl before the driver
	// removes its directory, port forwards and GC roots, and a test that takes an inventory
	// next must not find them half gone.
	var left []string
	must.Wait(a.t, wait.InitialSuccess(
		wait.BoolFunc(func() bool {
			left = nil
			for _, item := range bridgeInventory(a.t, a.dataDir()) {
				for _, al := range allocs {
					if strings.Contains(item, al.ID) || strings.Contains(item, "nomad-"+al.ID[:8]) {
						left = append(left, item)
					}
				}
			}
			return len(left) == 0
		}),
		wait.Timeout(scaled(2*time.Minute)), wait.Gap(500*time.Millisecond),
	), must.Func(func() string { return fmt.Sprintf("job %s left behind: %q", job, left) }))
}

type allocation struct {
	ID           string
	ClientStatus string
	TaskStates   map[string]struct {
		State  string
		Failed bool
		Events []struct {
			Type, DisplayMessage, DriverError string
		}
	}
	AllocatedResources struct {
		Shared struct {
			Ports []struct {
				Label  string
				Value  int
				To     int
				HostIP string
			}
		}
	}
}

func (a *nomadAgent) allocs(job string) []allocation {
	var allocs []allocation
	must.NoError(a.t, a.api("/v1/job/"+job+"/allocations", &allocs))
	return allocs
}

func (a *nomadAgent) alloc(id string) allocation {
	var al allocation
	must.NoError(a.t, a.api("/v1/allocation/"+id, &al))
	return al
}

// runningAlloc waits for the job's one allocation to run with every task running.
func (a *nomadAgent) runningAlloc(job string, timeout time.Duration) allocation {
	var got allocation
	err := wait.InitialSuccess(
		wait.ErrorFunc(func() error {
			allocs := a.allocs(job)
			if len(allocs) != 1 {
				return fmt.Errorf("%d allocations", len(allocs))
			}
			got = a.alloc(allocs[0].ID)
			if got.ClientStatus != "running" {
				return fmt.Errorf("allocation %s is %s", got.ID, got.ClientStatus)
			}
			for name, ts := range got.TaskStates {
				if ts.State != "running" {
					return fmt.Errorf("task %s is %s", name, ts.State)
				}
			}
			return nil
		}),
		wait.Timeout(timeout), wait.Gap(500*time.Millisecond),
	).Run()
	must.NoError(a.t, err, must.Sprintf("job %s did not run: %+v", job, got.TaskStates))
	return got
}

// failedTask waits for the job's task to fail and returns its driver error.
func (a *nomadAgent) failedTask(job, task string) string {
	var msg string
	must.Wait(a.t, wait.InitialSuccess(
		wait.BoolFunc(func() bool {
			for _, al := range a.allocs(job) {
				for _, e := range a.alloc(al.ID).TaskStates[task].Events {
					if e.DriverError != "" {
						msg = e.DriverError
						return true
					}
				}
			}
			return false
		}),
		wait.Timeout(scaled(time.Minute)), wait.Gap(time.Second),
	), must.Sprintf("task %s of job %s did not fail", task, job))
	return msg
}

func (al allocation) port(t testing.TB, label string) (hostIP string, value int) {
	for _, p := range al.AllocatedResources.Shared.Ports {
		if p.Label == label {
			return p.HostIP, p.Value
		}
	}
	t.Fatalf("allocation %s has no port %q: %+v", al.ID, label, al.AllocatedResources.Shared.Ports)
	return "", 0
}

func (al allocation) events(task string) string {
	var b strings.Builder
	for _, e := range al.TaskStates[task].Events {
		fmt.Fprintf(&b, "%s: %s %s\n", e.Type, e.DisplayMessage, e.DriverError)
	}
	return b.String()
}

// exec runs a command in a task through `nomad alloc exec`.
func (a *nomadAgent) exec(t *testing.T, alloc, task string, cmd ...string) string {
	t.Helper()
	out, err := a.nomad(append([]string{"alloc", "exec", "-i=false", "-t=false", "-task", task, alloc}, cmd...)...)
	must.NoError(t, err, must.Sprintf("nomad alloc exec %s: %s", cmd, out))
	return out
}

func leader(t *testing.T, machine string) int {
	t.Helper()
	pid, err := strconv.Atoi(strings.TrimSpace(run(t, "machinectl", "show", "-p", "Leader", "--value", machine)))
	must.NoError(t, err)
	return pid
}

// nsInode is the inode of a namespace file, which tells namespaces apart.
func nsInode(t *testing.T, path string) uint64 {
	t.Helper()
	var st syscall.Stat_t
	must.NoError(t, syscall.Stat(path, &st))
	return st.Ino
}

// bridgeInventory is what a bridge-mode allocation could leave behind: the driver's own
// (inventory), network namespaces, veth links and iptables rules.
func bridgeInventory(t testing.TB, dataDir string) []string {
	out := inventory(t, dataDir)
	entries, _ := os.ReadDir("/var/run/netns")
	for _, e := range entries {
		out = append(out, "netns "+e.Name())
	}
	for _, line := range strings.Split(run(t, "ip", "-o", "link", "show", "type", "veth"), "\n") {
		if f := strings.Fields(line); len(f) > 1 {
			out = append(out, "veth "+strings.SplitN(f[1], "@", 2)[0])
		}
	}
	for _, table := range []string{"filter", "nat"} {
		for _, rule := range strings.Split(run(t, "iptables", "-t", table, "-S"), "\n") {
			if rule != "" {
				out = append(out, "iptables "+table+" "+rule)
			}
		}
	}
	slices.Sort(out)
	return out
}

// A bridge-mode group of two machines and a raw_exec task under a real agent: the machines run
// in the group's namespace with user namespaces on; Nomad's port mapping, its alloc and host
// services, 127.0.0.1 between the tasks, port 80 in a guest, the group's DNS, a task restart and
// an agent restart all work, and the job's stop leaves nothing behind.
func TestBridge(t *testing.T) {
	requireCgroupV2(t)
	a := newNomadAgent(t)
	d := a.driverInfo(t)
	must.EqOp(t, "true", d.Attributes["driver.nixos-nspawn.bridge"], must.Sprint(d.HealthDescription))

	before := bridgeInventory(t, a.dataDir())
	t.Run("group", func(t *testing.T) { testBridgeGroup(t, a, before) })
	t.Run("refusals", func(t *testing.T) { testBridgeRefusals(t, a) })
	t.Run("cycles", func(t *testing.T) { testBridgeCycles(t, a) })
	t.Run("no CNI plugins", func(t *testing.T) { testBridgeWithoutCNI(t, a) })
}

func testBridgeGroup(t *testing.T, a *nomadAgent, before []string) {
	bb := busyboxPath(t) + "/bin/busybox"
	a.runJob("bridge.nomad.hcl", "toplevel="+systemdToplevel(t), "busybox="+bb)
	// The later subtests need the VM's two cores, whatever happened here.
	t.Cleanup(func() { _, _ = a.nomad("job", "stop", "-purge", "bridge") })
	al := a.runningAlloc("bridge", scaled(3*time.Minute))
	web, err := nspawn.MachineName(al.ID, "web")
	must.NoError(t, err)
	peer, err := nspawn.MachineName(al.ID, "peer")
	must.NoError(t, err)
	ns := filepath.Join("/var/run/netns", al.ID)
	must.StrContains(t, al.events("web"), "machine runs in the task group's network namespace "+ns)

	// Both machines run in the group's namespace, each in a user namespace of its own.
	for _, m := range []string{web, peer} {
		pid := leader(t, m)
		must.EqOp(t, nsInode(t, ns), nsInode(t, fmt.Sprintf("/proc/%d/ns/net", pid)), must.Sprintf("machine %s is not in the group's namespace", m))
		must.NotEq(t, nsInode(t, "/proc/1/ns/user"), nsInode(t, fmt.Sprintf("/proc/%d/ns/user", pid)), must.Sprintf("machine %s runs in the host's user namespace", m))
		uidMap, err := os.ReadFile(fmt.Sprintf("/proc/%d/uid_map", pid))
		must.NoError(t, err)
		must.StrNotContains(t, string(uidMap), "4294967295", must.Sprintf("machine %s has the identity mapping: %s", m, uidMap))
	}

	page := "Hello from task web of allocation " + al.ID
	hostIP, httpPort := al.port(t, "http")
	must.EqOp(t, "10.0.2.15", hostIP)
	must.StrContains(t, get(t, fmt.Sprintf("http://%s:%d/", hostIP, httpPort)), page)

	// Nomad's own service discovery: the allocation's address with the port inside, and the
	// host's address with the mapped port.
	var allocAddr string
	for _, svc := range []struct {
		name string
		port int
	}{{"bridge-web-alloc", 8080}, {"bridge-web-host", httpPort}} {
		var regs []struct {
			Address string
			Port    int
		}
		must.Wait(t, wait.InitialSuccess(
			wait.BoolFunc(func() bool { return a.api("/v1/service/"+svc.name, &regs) == nil && len(regs) == 1 }),
			wait.Timeout(scaled(30*time.Second)), wait.Gap(time.Second),
		), must.Sprintf("service %s was not registered", svc.name))
		must.EqOp(t, svc.port, regs[0].Port, must.Sprint(svc.name))
		if svc.name == "bridge-web-host" {
			must.EqOp(t, hostIP, regs[0].Address)
		} else {
			must.StrHasPrefix(t, "172.26.", regs[0].Address, must.Sprint("the allocation's address on Nomad's bridge"))
			allocAddr = regs[0].Address
		}
		must.StrContains(t, get(t, fmt.Sprintf("http://%s:%d/", regs[0].Address, regs[0].Port)), page, must.Sprint(svc.name))
	}

	// The tasks of the group reach each other on 127.0.0.1: machine to machine, raw_exec to
	// machine and machine to raw_exec.
	must.StrContains(t, a.exec(t, al.ID, "peer", bb, "wget", "-qO-", "http://127.0.0.1:8080/"), page)
	must.StrContains(t, a.exec(t, al.ID, "web", bb, "wget", "-qO-", "http://127.0.0.1:9090/"), "hello from raw_exec")
	must.Wait(t, wait.InitialSuccess(
		wait.BoolFunc(func() bool {
			out, _ := a.nomad("alloc", "logs", "-task", "side", al.ID)
			return strings.Contains(out, "side got: "+page)
		}),
		wait.Timeout(scaled(30*time.Second)), wait.Gap(time.Second),
	), must.Sprint("the raw_exec task never reached web on 127.0.0.1:8080"))

	// Port 80 in a guest: the namespace lets every process bind low ports.
	lowered, err := exec.Command("nsenter", "--net="+ns, "cat", "/proc/sys/net/ipv4/ip_unprivileged_port_start").Output()
	must.NoError(t, err)
	must.EqOp(t, "0", strings.TrimSpace(string(lowered)))
	// The machine that started first lowered it, and said so.
	must.StrContains(t, al.events("web")+al.events("peer"), "ports below 1024 opened to every process there")
	// It serves the guest's / (no -h: the nomad CLI takes -h anywhere for its help flag).
	server := exec.Command(a.bin, "alloc", "exec", "-i=false", "-t=false", "-task", "peer", al.ID, bb, "httpd", "-f", "-p", "80")
	var serverOut bytes.Buffer
	server.Stdout, server.Stderr = &serverOut, &serverOut
	must.NoError(t, server.Start())
	_, port80 := al.port(t, "http80")
	body, err := fetch(fmt.Sprintf("http://%s:%d/etc/hostname", hostIP, port80), scaled(time.Minute))
	_ = server.Process.Kill()
	_ = server.Wait()
	must.NoError(t, err, must.Sprintf("the guest's server on port 80: %s", serverOut.String()))
	must.EqOp(t, "nixos-e2e\n", body)

	// The group's dns block is the guest's resolv.conf.
	resolv := a.exec(t, al.ID, "web", "cat", "/etc/resolv.conf")
	for _, line := range []string{"nameserver 192.0.2.53", "search bridge.example", "options ndots:2"} {
		must.StrContains(t, resolv, line)
	}

	// A task restart boots the machine again in the same namespace, behind the same mapping.
	pid := leader(t, web)
	out, err := a.nomad("alloc", "restart", al.ID, "web")
	must.NoError(t, err, must.Sprint(out))
	must.Wait(t, wait.InitialSuccess(
		wait.BoolFunc(func() bool {
			out, err := exec.Command("machinectl", "show", "-p", "Leader", "--value", web).Output()
			p, _ := strconv.Atoi(strings.TrimSpace(string(out)))
			return err == nil && p != 0 && p != pid
		}),
		wait.Timeout(scaled(2*time.Minute)), wait.Gap(time.Second),
	), must.Sprint("machine web did not boot again"))
	a.runningAlloc("bridge", scaled(2*time.Minute))
	must.EqOp(t, nsInode(t, ns), nsInode(t, fmt.Sprintf("/proc/%d/ns/net", leader(t, web))))
	must.StrContains(t, get(t, fmt.Sprintf("http://%s:%d/", hostIP, httpPort)), page)

	// An agent restart: the machines run on untouched and are recovered.
	pid = leader(t, web)
	a.stop()
	must.StrContains(t, get(t, fmt.Sprintf("http://%s:%d/", hostIP, httpPort)), page, must.Sprint("while the agent is down"))
	a.start()
	a.runningAlloc("bridge", scaled(2*time.Minute))
	must.EqOp(t, pid, leader(t, web), must.Sprint("the agent restart restarted the machine"))
	must.StrContains(t, get(t, fmt.Sprintf("http://%s:%d/", hostIP, httpPort)), page)
	must.StrContains(t, a.exec(t, al.ID, "peer", bb, "wget", "-qO-", "http://127.0.0.1:8080/"), page)

	a.stopJob("bridge")
	// The first bridge-mode allocation on a host makes Nomad's chains (CNI-FORWARD, NOMAD-ADMIN,
	// CNI-HOSTPORT-*), which Nomad keeps: only rules that name this allocation or its address
	// are its own. testBridgeCycles compares everything, from after the first allocation.
	allocIP := regexp.MustCompile(`\b` + regexp.QuoteMeta(allocAddr) + `\b`)
	var left []string
	for _, item := range diff(before, bridgeInventory(t, a.dataDir())) {
		if strings.HasPrefix(item, "iptables ") && !strings.Contains(item, al.ID) && !allocIP.MatchString(item) {
			continue
		}
		left = append(left, item)
	}
	must.SliceEmpty(t, left, must.Sprintf("left behind by the bridge job: %q", left))
}

// fetch gets url, retrying for as long as timeout while the server starts.
func fetch(url string, timeout time.Duration) (string, error) {
	client := &http.Client{Timeout: 2 * time.Second}
	var body string
	err := wait.InitialSuccess(wait.ErrorFunc(func() error {
		resp, err := client.Get(url)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		body = string(b)
		return err
	}), wait.Timeout(timeout), wait.Gap(200*time.Millisecond)).Run()
	return body, err
}

// diff lists what after holds and before did not.
func diff(before, after []string) []string {
	var out []string
	for _, item := range after {
		if !slices.Contains(before, item) {
			out = append(out, item)
		}
	}
	return out
}

// A task that sets its own network in a bridge-mode group is refused, saying why; the same
// network_mode in a host-mode group runs.
func testBridgeRefusals(t *testing.T, a *nomadAgent) {
	for _, tc := range []struct{ mode, networkMode, want string }{
		{"bridge", "veth", `network_mode = "veth": the task group has a network namespace of its own (network { mode = "bridge" }), which the machine runs in; remove network_mode from the task config`},
		{"bridge", "host", `network_mode = "host": the task group has a network namespace of its own`},
	} {
		a.runJob("bridge-web.nomad.hcl", "toplevel="+tinyToplevel(t), "mode="+tc.mode, "network_mode="+tc.networkMode)
		must.StrContains(t, a.failedTask("bridge-web", "web"), tc.want)
		a.stopJob("bridge-web")
	}
	a.runJob("bridge-web.nomad.hcl", "toplevel="+tinyToplevel(t), "mode=host", "network_mode=veth")
	a.runningAlloc("bridge-web", scaled(time.Minute))
	a.stopJob("bridge-web")
}

// 20 runs and stops of a bridge-mode job leave no veth, network namespace, iptables rule, unit
// or machine behind.
func testBridgeCycles(t *testing.T, a *nomadAgent) {
	before := bridgeInventory(t, a.dataDir())
	start := time.Now()
	for i := range 20 {
		a.runJob("bridge-web.nomad.hcl", "toplevel="+tinyToplevel(t), "mode=bridge")
		al := a.runningAlloc("bridge-web", scaled(time.Minute))
		_, err := os.Stat(filepath.Join("/var/run/netns", al.ID))
		must.NoError(t, err, must.Sprintf("cycle %d", i))
		a.stopJob("bridge-web")
	}
	t.Logf("20 cycles in %s", time.Since(start).Round(time.Second))
	after := bridgeInventory(t, a.dataDir())
	must.SliceEmpty(t, diff(before, after), must.Sprintf("left behind by 20 cycles: %q", diff(before, after)))
	must.SliceEmpty(t, diff(after, before), must.Sprintf("gone after 20 cycles: %q", diff(after, before)))
}

// driverInfo is what the agent's one node reports of the nixos-nspawn driver.
func (a *nomadAgent) driverInfo(t *testing.T) (d struct {
	Attributes        map[string]string
	HealthDescription string
}) {
	t.Helper()
	var node []struct{ ID string }
	must.NoError(t, a.api("/v1/nodes", &node))
	var detail struct {
		Drivers map[string]struct {
			Attributes        map[string]string
			HealthDescription string
		}
	}
	must.NoError(t, a.api("/v1/node/"+node[0].ID, &detail))
	return detail.Drivers["nixos-nspawn"]
}

// Without the CNI plugins in the plugin config's cni_path the fingerprint says bridge mode is
// unavailable, and a bridge-mode task is refused with the reason.
func testBridgeWithoutCNI(t *testing.T, a *nomadAgent) {
	a.stop()
	a.driverCNIPath = t.TempDir()
	a.start()
	d := a.driverInfo(t)
	must.EqOp(t, "false", d.Attributes["driver.nixos-nspawn.bridge"])
	must.StrContains(t, d.HealthDescription, "bridge mode unavailable: the CNI plugins bridge, firewall, host-local, loopback, portmap are not in cni_path")
	a.runJob("bridge-web.nomad.hcl", "toplevel="+tinyToplevel(t), "mode=bridge")
	must.StrContains(t, a.failedTask("bridge-web", "web"), "the task group's network namespace (bridge mode) cannot be used on this host: the CNI plugins bridge, firewall, host-local, loopback, portmap are not in cni_path = \""+a.driverCNIPath+"\"")
	a.stopJob("bridge-web")
}

// From `nomad job run` to the guest's web service answering on the host's address and the
// group's port, for a bridge-mode group and for a host-mode group with the driver's veth and
// port forward (make vm-bench-bridge). Each run registers the job anew and purges it after.
func BenchmarkJobRunToAnswer(b *testing.B) {
	toplevel := os.Getenv("NIXOS_NSPAWN_SYSTEMD_TOPLEVEL")
	if toplevel == "" {
		b.Fatal("NIXOS_NSPAWN_SYSTEMD_TOPLEVEL is not set: run through make vm-bench-bridge")
	}
	a := newNomadAgent(b)
	client := &http.Client{Timeout: 2 * time.Second}
	for _, mode := range []string{"bridge", "host"} {
		b.Run(mode, func(b *testing.B) {
			for range b.N {
				a.runJob("bridge-web.nomad.hcl", "toplevel="+toplevel, "mode="+mode)
				var url string
				err := wait.InitialSuccess(wait.ErrorFunc(func() error {
					if url == "" {
						allocs := a.allocs("bridge-web")
						if len(allocs) != 1 {
							return fmt.Errorf("%d allocations", len(allocs))
						}
						for _, p := range a.alloc(allocs[0].ID).AllocatedResources.Shared.Ports {
							if p.Label == "http" {
								url = fmt.Sprintf("http://%s:%d/", p.HostIP, p.Value)
							}
						}
						if url == "" {
							return errors.New("no port yet")
						}
					}
					resp, err := client.Get(url)
					if err != nil {
						return err
					}
					defer resp.Body.Close()
					body, err := io.ReadAll(resp.Body)
					if err == nil && !strings.Contains(string(body), "Hello from task web") {
						err = fmt.Errorf("page %q", body)
					}
					return err
				}), wait.Timeout(scaled(3*time.Minute)), wait.Gap(100*time.Millisecond)).Run()
				must.NoError(b, err, must.Sprintf("mode %s: the service never answered", mode))
				b.StopTimer()
				a.stopJob("bridge-web")
				b.StartTimer()
			}
		})
	}
}
