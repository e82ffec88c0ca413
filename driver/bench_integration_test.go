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

// Start to READY of the fixtures through the driver (Nomad's gRPC harness, StartTask until the
// readiness event) against a bare `systemd-run -p Type=notify ... systemd-nspawn` of the same
// closure, which returns once the guest is ready. Run with `make bench`.
func BenchmarkStartToReady(b *testing.B) {
	for _, fx := range []struct{ name, env string }{
		{"tiny", "NIXOS_NSPAWN_TINY_TOPLEVEL"},
		{"systemd", "NIXOS_NSPAWN_SYSTEMD_TOPLEVEL"},
	} {
		toplevel := os.Getenv(fx.env)
		if toplevel == "" {
			b.Fatalf("%s is not set: run benchmarks through `make bench`", fx.env)
		}
		b.Run(fx.name+"/driver", func(b *testing.B) { benchDriver(b, toplevel, storeViewClosure) })
		b.Run(fx.name+"/driver-host-view", func(b *testing.B) { benchDriver(b, toplevel, storeViewHost) })
		b.Run(fx.name+"/bare-systemd-run", func(b *testing.B) { benchBare(b, toplevel) })
	}
}

// Start to READY of a system with 1,002 paths in its closure, with the closure-only view (one
// bind mount per path) and with the whole host store bound once.
func BenchmarkStoreView(b *testing.B) {
	wide := os.Getenv("NIXOS_NSPAWN_WIDE_TOPLEVEL")
	if wide == "" {
		b.Fatal("NIXOS_NSPAWN_WIDE_TOPLEVEL is not set: run benchmarks through `make bench`")
	}
	for _, view := range []string{storeViewClosure, storeViewHost} {
		b.Run("wide/"+view, func(b *testing.B) { benchDriver(b, wide, view) })
	}
}

// Time from start to the machine having its address (tiny fixture): through the driver,
// StartTask returns with both ends addressed; bare, systemd-run + systemd-nspawn (until READY,
// which the tiny init reports at once) and then the same addressing with ip(8), as NixOS's
// container scripts do.
func BenchmarkTimeToAddress(b *testing.B) {
	toplevel := os.Getenv("NIXOS_NSPAWN_TINY_TOPLEVEL")
	if toplevel == "" {
		b.Fatal("NIXOS_NSPAWN_TINY_TOPLEVEL is not set: run benchmarks through `make bench`")
	}
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
			bareStart(b, name, root, toplevel, "--network-veth-extra="+link+":eth0")
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
func bareStart(b *testing.B, name, root, toplevel, network string) {
	out, err := exec.Command("systemd-run", "--quiet", "--unit="+name,
		"-p", "Type=notify", "-p", "NotifyAccess=all", "-p", "Delegate=yes", "-p", "RemainAfterExit=yes", "-p", "KillMode=mixed",
		"systemd-nspawn", "--quiet", "--keep-unit", "--settings=no", "-D", root, "-M", name, "-U",
		"--bind-ro=/nix/store", "--notify-ready=yes", "--kill-signal=SIGRTMIN+3", "--console=read-only",
		"--link-journal=no", network, toplevel+"/init").CombinedOutput()
	must.NoError(b, err, must.Sprint(string(out)))
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

func benchDriver(b *testing.B, toplevel, view string) {
	d := benchNewDriver(b)
	defer d.Shutdown()
	events, err := d.TaskEvents(context.Background())
	must.NoError(b, err)
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		task := benchTask(b, toplevel, fmt.Sprintf("bench%d", i), view)
		b.StartTimer()
		_, _, err := d.StartTask(task)
		must.NoError(b, err)
		waitEvent(b, events, task.ID, "ready", time.Minute)
		b.StopTimer()
		must.NoError(b, d.StopTask(task.ID, 30*time.Second, ""))
		must.NoError(b, d.DestroyTask(task.ID, true))
		b.StartTimer()
	}
}

func benchBare(b *testing.B, toplevel string) {
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		name := fmt.Sprintf("benchbare%d", i)
		root := filepath.Join(b.TempDir(), "root")
		must.NoError(b, nspawn.PrepareRoot(root))
		b.StartTimer()
		bareStart(b, name, root, toplevel, "--network-veth")
		b.StopTimer()
		_ = exec.Command("systemctl", "stop", name).Run()
		_ = exec.Command("systemctl", "reset-failed", name).Run()
		must.NoError(b, nspawn.RemoveRoot(root))
		b.StartTimer()
	}
}

// The resident memory of the real plugin binary, served over go-plugin as Nomad does, while it
// follows a number of running machines.
func BenchmarkPluginRSS(b *testing.B) {
	binary := os.Getenv("NIXOS_NSPAWN_PLUGIN")
	toplevel := os.Getenv("NIXOS_NSPAWN_TINY_TOPLEVEL")
	if binary == "" || toplevel == "" {
		b.Fatal("NIXOS_NSPAWN_PLUGIN and NIXOS_NSPAWN_TINY_TOPLEVEL must be set: run through `make bench`")
	}
	for i := 0; i < b.N; i++ {
		for _, machines := range []int{0, 10} {
			rss, forwarders := pluginRSS(b, binary, toplevel, machines)
			b.ReportMetric(rss, fmt.Sprintf("RSS-MiB/%d-machines", machines))
			if machines > 0 {
				// What each machine costs outside the guest besides nspawn: its console forwarder.
				b.ReportMetric(forwarders.pss, "forwarder-PSS-MiB/machine")
				b.ReportMetric(forwarders.rss, "forwarder-RSS-MiB/machine")
			}
		}
	}
}

type memory struct{ rss, pss float64 }

// pluginRSS returns the plugin's RSS while it follows machines, and the mean memory of their
// console forwarders.
func pluginRSS(b *testing.B, binary, toplevel string, machines int) (float64, memory) {
	client := plugin.NewClient(&plugin.ClientConfig{
		HandshakeConfig:  base.Handshake,
		Plugins:          map[string]plugin.Plugin{base.PluginTypeDriver: drivers.NewDriverPlugin(nil, hclog.NewNullLogger())},
		Cmd:              exec.Command(binary),
		AllowedProtocols: []plugin.Protocol{plugin.ProtocolGRPC},
		Logger:           hclog.NewNullLogger(),
	})
	defer client.Kill()
	rpc, err := client.Client()
	must.NoError(b, err)
	raw, err := rpc.Dispense(base.PluginTypeDriver)
	must.NoError(b, err)
	d := raw.(drivers.DriverPlugin)
	var cfg []byte
	must.NoError(b, base.MsgPackEncode(&cfg, &PluginConfig{Enabled: true, DataDir: b.TempDir(), Slice: defaultSlice, TasksMax: defaultTasksMax,
		AddressPool: defaultAddressPool, AddressPoolIPv6: defaultAddressPoolIPv6}))
	must.NoError(b, d.SetConfig(&base.Config{PluginConfig: cfg, AgentConfig: &base.AgentConfig{
		Driver: &base.ClientDriverConfig{Topology: numalib.Scan(numalib.PlatformScanners(false))},
	}}))
	var ids []string
	for i := 0; i < machines; i++ {
		task := benchTask(b, toplevel, fmt.Sprintf("rss%d", i), storeViewClosure)
		_, _, err := d.StartTask(task)
		must.NoError(b, err)
		ids = append(ids, task.ID)
	}
	defer func() {
		for _, id := range ids {
			_ = d.StopTask(id, 10*time.Second, "")
			_ = d.DestroyTask(id, true)
		}
	}()
	// Let the watchers settle into their steady state.
	time.Sleep(3 * time.Second)
	var forwarders memory
	for _, id := range ids {
		machine := machineOfTaskID(b, id)
		out, err := exec.Command("systemctl", "show", "-p", "MainPID", "--value", nspawn.ConsoleUnit(machine)).Output()
		must.NoError(b, err)
		pid, err := strconv.Atoi(strings.TrimSpace(string(out)))
		must.NoError(b, err)
		must.Positive(b, pid, must.Sprint("the console forwarder of ", machine, " does not run"))
		forwarders.rss += smapsRollup(b, pid, "Rss:") / float64(len(ids))
		forwarders.pss += smapsRollup(b, pid, "Pss:") / float64(len(ids))
	}
	return vmRSS(b, client.ReattachConfig().Pid), forwarders
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
	toplevel := os.Getenv("NIXOS_NSPAWN_TINY_TOPLEVEL")
	if toplevel == "" {
		b.Fatal("NIXOS_NSPAWN_TINY_TOPLEVEL is not set: run benchmarks through `make bench`")
	}
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
