// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

//go:build integration

package driver

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	sddbus "github.com/coreos/go-systemd/v22/dbus"
	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/go-plugin"
	"github.com/hashicorp/nomad/client/lib/numalib"
	"github.com/hashicorp/nomad/helper/uuid"
	"github.com/hashicorp/nomad/nomad/structs"
	"github.com/hashicorp/nomad/plugins/base"
	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/shoenig/test/must"

	"github.com/nomad-nixos/nomad-driver-nixos/hostnet"
	"github.com/nomad-nixos/nomad-driver-nixos/nspawn"
)

// Start to READY of the fixtures through the driver (StartTask until the readiness event), with
// the closure view and with the host's store, against a bare `systemd-run -p Type=notify ...
// systemd-nspawn` of the same closure, which returns once the guest is ready; taking turns in
// the same run. One driver serves all runs, so the closure is known after the first, as on a
// Nomad client. Run with `make bench`.
func BenchmarkStartToReady(b *testing.B) {
	d := benchNewDriver(b)
	defer d.Shutdown()
	ready := followReadiness(b, d)
	for _, fx := range []struct{ name, env string }{
		{"tiny", "NIXOS_NSPAWN_TINY_TOPLEVEL"},
		{"systemd", "NIXOS_NSPAWN_SYSTEMD_TOPLEVEL"},
	} {
		toplevel := fixture(b, fx.env)
		b.Run(fx.name, func(b *testing.B) {
			var closureView, hostView, bare time.Duration
			for i := 0; i < b.N; i++ {
				closureView += startToReady(b, d, ready, toplevel, fmt.Sprintf("bench%d", i), storeViewClosure)
				hostView += startToReady(b, d, ready, toplevel, fmt.Sprintf("benchhost%d", i), storeViewHost)
				bare += bareStartToReady(b, toplevel, fmt.Sprintf("benchbare%d", i))
			}
			n := time.Duration(b.N)
			reportMs(b, closureView/n, "driver-ms")
			reportMs(b, hostView/n, "driver-host-view-ms")
			reportMs(b, bare/n, "bare-ms")
			b.ReportMetric(float64(closureView)/float64(bare), "driver/bare")
			b.ReportMetric(float64(hostView)/float64(bare), "driver-host-view/bare")
			b.ReportMetric(0, "ns/op")
		})
	}
}

// A unit's state as the driver reads it (Status: the dozen properties it needs, sent together)
// against one property read, and against the same dozen read one after another; of a service
// every test host runs.
func BenchmarkUnitStatus(b *testing.B) {
	const unit = "systemd-journald.service"
	ctx := context.Background()
	mgr := nspawn.NewManager()
	defer mgr.Close()
	sd, err := sddbus.NewSystemConnectionContext(ctx)
	must.NoError(b, err)
	defer sd.Close()
	twelve := []struct{ iface, name string }{
		{"Unit", "LoadState"}, {"Unit", "InvocationID"}, {"Unit", "ActiveState"}, {"Unit", "SubState"},
		{"Unit", "Description"}, {"Unit", "ActiveEnterTimestampMonotonic"}, {"Service", "Result"},
		{"Service", "ControlGroup"}, {"Service", "MainPID"}, {"Service", "ExecMainCode"},
		{"Service", "ExecMainStatus"}, {"Unit", "LoadState"},
	}
	var status, one, sequential time.Duration
	for i := 0; i < b.N; i++ {
		t := time.Now()
		st, err := mgr.Status(ctx, unit)
		status += time.Since(t)
		must.NoError(b, err)
		must.True(b, st.Ready() && st.MainPID > 0, must.Sprintf("%+v", st))
		t = time.Now()
		_, err = sd.GetUnitTypePropertyContext(ctx, unit, "Service", "MainPID")
		one += time.Since(t)
		must.NoError(b, err)
		t = time.Now()
		for _, p := range twelve {
			_, err = sd.GetUnitTypePropertyContext(ctx, unit, p.iface, p.name)
			must.NoError(b, err)
		}
		sequential += time.Since(t)
	}
	n := time.Duration(b.N)
	b.ReportMetric(float64((status / n).Microseconds()), "status-us")
	b.ReportMetric(float64((one / n).Microseconds()), "one-read-us")
	b.ReportMetric(float64((sequential / n).Microseconds()), "twelve-one-by-one-us")
	b.ReportMetric(float64(status)/float64(one), "status/one-read")
	b.ReportMetric(float64(status)/float64(sequential), "status/one-by-one")
	b.ReportMetric(0, "ns/op")
}

// Start to READY of a system with 1,002 paths in its closure, with the closure-only view (one
// bind mount per path) against the whole host store bound once.
func BenchmarkStoreView(b *testing.B) {
	wide := fixture(b, "NIXOS_NSPAWN_WIDE_TOPLEVEL")
	d := benchNewDriver(b)
	defer d.Shutdown()
	ready := followReadiness(b, d)
	var closureView, hostView time.Duration
	for i := 0; i < b.N; i++ {
		closureView += startToReady(b, d, ready, wide, fmt.Sprintf("wide%d", i), storeViewClosure)
		hostView += startToReady(b, d, ready, wide, fmt.Sprintf("widehost%d", i), storeViewHost)
	}
	n := time.Duration(b.N)
	reportMs(b, closureView/n, "closure-view-ms")
	reportMs(b, hostView/n, "host-view-ms")
	b.ReportMetric(float64(closureView)/float64(hostView), "closure/host")
	b.ReportMetric(0, "ns/op")
}

// Time from start to the machine having its address (tiny fixture): through the driver,
// StartTask returns with both ends addressed; bare, systemd-run + systemd-nspawn (until READY,
// which the tiny init reports at once) and then the same addressing with ip(8), as NixOS's
// container scripts do.
func BenchmarkTimeToAddress(b *testing.B) {
	toplevel := fixture(b, "NIXOS_NSPAWN_TINY_TOPLEVEL")
	b.Run("driver", func(b *testing.B) {
		d := benchNewDriver(b)
		defer d.Shutdown()
		for i := 0; i < b.N; i++ {
			b.StopTimer()
			task := benchTask(b, toplevel, fmt.Sprintf("addr%d", i), storeViewClosure)
			b.StartTimer()
			_, network, err := d.StartTask(task)
			b.StopTimer()
			must.NoError(b, err)
			machine := machineOfTaskID(b, task.ID)
			leader, err := d.mgr.Leader(machine)
			must.NoError(b, err)
			out, err := exec.Command("nsenter", "-t", strconv.Itoa(leader), "-n", "ip", "-o", "addr", "show", "dev", hostnet.GuestInterface).CombinedOutput()
			must.NoError(b, err, must.Sprint(string(out)))
			must.StrContains(b, string(out), network.IP+"/30")
			must.NoError(b, d.StopTask(task.ID, 30*time.Second, ""))
			must.NoError(b, d.DestroyTask(task.ID, true))
			b.StartTimer()
		}
	})
	b.Run("bare-nspawn-and-ip", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			b.StopTimer()
			name := fmt.Sprintf("benchaddr%d", i)
			link := fmt.Sprintf("vx-bench%d", i)
			root := filepath.Join(b.TempDir(), "root")
			must.NoError(b, nspawn.PrepareRoot(root))
			b.StartTimer()
			must.NoError(b, bareStart(name, root, toplevel, "--network-veth-extra="+link+":eth0"))
			leader, err := exec.Command("machinectl", "show", "-p", "Leader", "--value", name).Output()
			must.NoError(b, err)
			pid := strings.TrimSpace(string(leader))
			for _, cmd := range [][]string{
				{"ip", "addr", "add", "10.236.0.1/30", "dev", link},
				{"ip", "link", "set", link, "up"},
				{"nsenter", "-t", pid, "-n", "ip", "addr", "add", "10.236.0.2/30", "dev", "eth0"},
				{"nsenter", "-t", pid, "-n", "ip", "link", "set", "eth0", "up"},
			} {
				out, err := exec.Command(cmd[0], cmd[1:]...).CombinedOutput()
				must.NoError(b, err, must.Sprint(string(out)))
			}
			b.StopTimer()
			_ = exec.Command("systemctl", "stop", name).Run()
			_ = exec.Command("systemctl", "reset-failed", name).Run()
			must.NoError(b, nspawn.RemoveRoot(root))
			b.StartTimer()
		}
	})
}

// bareStart runs the tiny or systemd fixture as the NixOS launch contract says, without the
// driver: systemd-run returns once the guest reported READY=1.
func bareStart(name, root, toplevel, network string) error {
	out, err := exec.Command("systemd-run", "--quiet", "--unit="+name,
		"-p", "Type=notify", "-p", "NotifyAccess=all", "-p", "Delegate=yes", "-p", "RemainAfterExit=yes", "-p", "KillMode=mixed",
		"systemd-nspawn", "--quiet", "--keep-unit", "--settings=no", "-D", root, "-M", name, "-U",
		"--bind-ro=/nix/store", "--notify-ready=yes", "--kill-signal=SIGRTMIN+3", "--console=read-only",
		"--link-journal=no", network, toplevel+"/init").CombinedOutput()
	if err != nil {
		return fmt.Errorf("systemd-run %s: %w: %s", name, err, out)
	}
	return nil
}

// benchNewDriver is a configured driver with the default plugin config.
func benchNewDriver(b *testing.B) *Driver {
	d := NewDriver(hclog.NewNullLogger())
	var cfg []byte
	must.NoError(b, base.MsgPackEncode(&cfg, &PluginConfig{Enabled: true, DataDir: b.TempDir(), Slice: defaultSlice, TasksMax: defaultTasksMax,
		AddressPool: defaultAddressPool, AddressPoolIPv6: defaultAddressPoolIPv6}))
	must.NoError(b, d.SetConfig(&base.Config{PluginConfig: cfg, AgentConfig: &base.AgentConfig{
		Driver: &base.ClientDriverConfig{Topology: numalib.Scan(numalib.PlatformScanners(false))},
	}}))
	return d
}

// startToReady starts a task and returns how long until it was READY; then stops and destroys it.
func startToReady(b *testing.B, d *Driver, ready *readiness, toplevel, name, view string) time.Duration {
	task := benchTask(b, toplevel, name, view)
	t0 := time.Now()
	_, _, err := d.StartTask(task)
	must.NoError(b, err)
	must.NoError(b, ready.wait(task.ID, time.Minute))
	took := time.Since(t0)
	must.NoError(b, d.StopTask(task.ID, 30*time.Second, ""))
	must.NoError(b, d.DestroyTask(task.ID, true))
	return took
}

// bareStartToReady starts the closure bare and returns how long until it was READY; then stops it.
func bareStartToReady(b *testing.B, toplevel, name string) time.Duration {
	root := filepath.Join(b.TempDir(), "root")
	must.NoError(b, nspawn.PrepareRoot(root))
	t0 := time.Now()
	must.NoError(b, bareStart(name, root, toplevel, "--network-veth"))
	took := time.Since(t0)
	_ = exec.Command("systemctl", "stop", name).Run()
	_ = exec.Command("systemctl", "reset-failed", name).Run()
	must.NoError(b, nspawn.RemoveRoot(root))
	return took
}

type memory struct{ rss, pss float64 }

// servedPlugin is the real plugin binary, served over go-plugin.
type servedPlugin struct {
	drivers.DriverPlugin
	pid     int
	dataDir string
	kill    func()
}

// servePlugin runs the real plugin binary over go-plugin, as Nomad does, configured with the
// default plugin config.
func servePlugin(b *testing.B, binary string) servedPlugin {
	client := plugin.NewClient(&plugin.ClientConfig{
		HandshakeConfig:  base.Handshake,
		Plugins:          map[string]plugin.Plugin{base.PluginTypeDriver: drivers.NewDriverPlugin(nil, hclog.NewNullLogger())},
		Cmd:              exec.Command(binary),
		AllowedProtocols: []plugin.Protocol{plugin.ProtocolGRPC},
		Logger:           hclog.NewNullLogger(),
	})
	rpc, err := client.Client()
	if err != nil {
		client.Kill()
		b.Fatal(err)
	}
	raw, err := rpc.Dispense(base.PluginTypeDriver)
	if err != nil {
		client.Kill()
		b.Fatal(err)
	}
	d := raw.(drivers.DriverPlugin)
	b.Cleanup(client.Kill)
	dataDir := b.TempDir()
	var cfg []byte
	must.NoError(b, base.MsgPackEncode(&cfg, &PluginConfig{Enabled: true, DataDir: dataDir, Slice: defaultSlice, TasksMax: defaultTasksMax,
		AddressPool: defaultAddressPool, AddressPoolIPv6: defaultAddressPoolIPv6}))
	if err := d.SetConfig(&base.Config{PluginConfig: cfg, AgentConfig: &base.AgentConfig{
		Driver: &base.ClientDriverConfig{Topology: numalib.Scan(numalib.PlatformScanners(false))},
	}}); err != nil {
		client.Kill()
		b.Fatal(err)
	}
	return servedPlugin{DriverPlugin: d, pid: client.ReattachConfig().Pid, dataDir: dataDir, kill: client.Kill}
}

// forwarderMemory is the memory of a machine's console forwarder.
func forwarderMemory(b *testing.B, machine string) memory {
	return unitMemory(b, nspawn.ConsoleUnit(machine))
}

// unitMemory is the memory of a unit's main process.
func unitMemory(b *testing.B, unit string) memory {
	out, err := exec.Command("systemctl", "show", "-p", "MainPID", "--value", unit).Output()
	must.NoError(b, err)
	pid, err := strconv.Atoi(strings.TrimSpace(string(out)))
	must.NoError(b, err)
	must.Positive(b, pid, must.Sprint(unit, " has no main process"))
	return memory{rss: smapsRollup(b, pid, "Rss:"), pss: smapsRollup(b, pid, "Pss:")}
}

// smapsRollup reads one field of a process's memory summary, in MiB.
func smapsRollup(b *testing.B, pid int, field string) float64 {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	must.NoError(b, err)
	for _, line := range strings.Split(string(raw), "\n") {
		if v, ok := strings.CutPrefix(line, field); ok {
			kb, err := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			must.NoError(b, err)
			return float64(kb) / 1024
		}
	}
	b.Fatalf("no %s in /proc/%d/smaps_rollup", field, pid)
	return 0
}

// Sustained console throughput: a guest writes 100 MB of 100-byte lines to its console, which
// reach a reader of the task's stdout FIFO that writes them to a file, as Nomad's logmon does;
// against the same guest writing the same lines to a file in its root. Both are timed from the
// guest's "ready" line to its "flood done" line, as the reader sees them.
func BenchmarkConsoleThroughput(b *testing.B) {
	toplevel := fixture(b, "NIXOS_NSPAWN_TINY_TOPLEVEL")
	const size = 100_000_000
	d := benchNewDriver(b)
	defer d.Shutdown()
	var console, file time.Duration
	for i := 0; i < b.N; i++ {
		console += floodTime(b, d, toplevel, fmt.Sprintf("cons%d", i), fmt.Sprintf("flood=%d", size))
		file += floodTime(b, d, toplevel, fmt.Sprintf("file%d", i), fmt.Sprintf("floodfile=%d", size))
	}
	mbps := func(d time.Duration) float64 { return float64(size*b.N) / 1e6 / d.Seconds() }
	b.ReportMetric(mbps(console), "console-MB/s")
	b.ReportMetric(mbps(console)*1e6/100, "console-lines/s")
	b.ReportMetric(mbps(file), "guest-file-MB/s")
	b.ReportMetric(mbps(console)/mbps(file), "console/file")
	b.ReportMetric(0, "ns/op")
}

// floodTime runs a guest with the flood word and returns the time from its ready line to its
// flood done line at the reader.
func floodTime(b *testing.B, d *Driver, toplevel, name, word string) time.Duration {
	task := benchTask(b, toplevel, name, storeViewClosure)
	must.NoError(b, task.EncodeConcreteDriverConfig(&TaskConfig{Toplevel: toplevel, InitArgs: []string{word, "exit=0"},
		ReadyTimeout: "60s", PrivateUsers: "pick", RebootPolicy: "exit", StoreView: storeViewClosure}))
	task.StdoutPath = filepath.Join(b.TempDir(), "stdout.fifo")
	must.NoError(b, syscall.Mkfifo(task.StdoutPath, 0o600))
	logFile, err := os.Create(filepath.Join(b.TempDir(), name+".stdout.0"))
	must.NoError(b, err)
	defer logFile.Close()
	done := make(chan time.Duration, 1)
	go func() {
		f, err := os.Open(task.StdoutPath)
		if err != nil {
			panic(err)
		}
		defer f.Close()
		w := bufio.NewWriterSize(logFile, 64<<10)
		defer w.Flush()
		r := bufio.NewReaderSize(f, 64<<10)
		var ready time.Time
		for {
			line, err := r.ReadSlice('\n')
			_, _ = w.Write(line)
			switch {
			case bytes.HasPrefix(line, []byte("tinyinit: ready")):
				ready = time.Now()
			case bytes.HasPrefix(line, []byte("tinyinit: flood done")):
				done <- time.Since(ready)
			case bytes.HasPrefix(line, []byte("tinyinit: unknown arg")):
				// A fixture older than the flood words.
				done <- -1
			}
			if err != nil && err != bufio.ErrBufferFull {
				return
			}
		}
	}()
	_, _, err = d.StartTask(task)
	must.NoError(b, err)
	defer func() { _ = d.DestroyTask(task.ID, true) }()
	select {
	case took := <-done:
		must.Positive(b, took, must.Sprintf("the tiny fixture does not know %q: rebuild it (e2e/fixtures/build.sh)", word))
		ch, err := d.WaitTask(context.Background(), task.ID)
		must.NoError(b, err)
		<-ch
		return took
	case <-time.After(10 * time.Minute):
		b.Fatalf("%s: no flood done line within 10 minutes", word)
		return 0
	}
}

// benchTask is a task with bare alloc directories and no log collection.
func benchTask(b *testing.B, toplevel, name, view string) *drivers.TaskConfig {
	allocID := uuid.Generate()
	allocDir := b.TempDir()
	for _, d := range []string{"alloc/logs", name + "/local", name + "/secrets"} {
		must.NoError(b, os.MkdirAll(filepath.Join(allocDir, d), 0o777))
	}
	cfg := &drivers.TaskConfig{
		ID: allocID + "/" + name + "/" + uuid.Generate()[:8], Name: name, AllocID: allocID, AllocDir: allocDir,
		StdoutPath: "/dev/null", StderrPath: "/dev/null",
		Resources: &drivers.Resources{
			NomadResources: &structs.AllocatedTaskResources{Memory: structs.AllocatedMemoryResources{MemoryMB: 256}},
			LinuxResources: &drivers.LinuxResources{},
		},
	}
	must.NoError(b, cfg.EncodeConcreteDriverConfig(&TaskConfig{Toplevel: toplevel, ReadyTimeout: "60s", PrivateUsers: "pick", RebootPolicy: "exit", StoreView: view}))
	return cfg
}

func vmRSS(b *testing.B, pid int) float64 {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	must.NoError(b, err)
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			kb, err := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			must.NoError(b, err)
			return float64(kb) / 1024
		}
	}
	b.Fatal("no VmRSS")
	return 0
}
