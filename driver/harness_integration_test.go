// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

//go:build integration

package driver

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/nomad/client/lib/numalib"
	"github.com/hashicorp/nomad/helper/uuid"
	"github.com/hashicorp/nomad/nomad/structs"
	"github.com/hashicorp/nomad/plugins/base"
	"github.com/hashicorp/nomad/plugins/drivers"
	dtestutil "github.com/hashicorp/nomad/plugins/drivers/testutils"
	"github.com/shoenig/test/must"
	"github.com/shoenig/test/wait"

	"github.com/nomad-nixos/nomad-driver-nixos/hostnet"
	"github.com/nomad-nixos/nomad-driver-nixos/nspawn"
)

// TestMain lets the test binary stand in for the plugin binary, which the driver also runs as
// exec session starter.
func TestMain(m *testing.M) {
	if code, ok := nspawn.Helper(os.Args[1:]); ok {
		os.Exit(code)
	}
	os.Exit(m.Run())
}

// These tests need root, a running systemd with machined, systemd-nspawn and the fixture
// closures; `make test` runs them inside the systemd test host (e2e/testhost).

func fixture(t testing.TB, name string) string {
	t.Helper()
	p := os.Getenv(name)
	if p == "" {
		t.Fatalf("%s is not set: run the integration tests through `make test`, the benchmarks through `make bench`", name)
	}
	return p
}

// scaled stretches a wait (and the default ready_timeout) by NIXOS_NSPAWN_TEST_TIME_SCALE, for
// hosts far slower than the test host, such as the emulated VM host (make vm sets it).
func scaled(d time.Duration) time.Duration {
	if f, err := strconv.ParseFloat(os.Getenv("NIXOS_NSPAWN_TEST_TIME_SCALE"), 64); err == nil && f >= 1 {
		return time.Duration(float64(d) * f)
	}
	return d
}

func tinyToplevel(t *testing.T) string    { return fixture(t, "NIXOS_NSPAWN_TINY_TOPLEVEL") }
func systemdToplevel(t *testing.T) string { return fixture(t, "NIXOS_NSPAWN_SYSTEMD_TOPLEVEL") }

type testDriver struct {
	*dtestutil.DriverHarness
	d       *Driver
	dataDir string
	// allocDirs are removed when the test of the driver ends: removing one closes the harness.
	allocDirs []func()
}

// newTestDriver serves a fresh driver over Nomad's in-memory gRPC harness. A data dir shared with
// an earlier driver simulates a plugin restart.
func newTestDriver(t *testing.T, dataDir string, mutate ...func(*PluginConfig)) *testDriver {
	t.Helper()
	if dataDir == "" {
		dataDir = t.TempDir()
	}
	d := NewDriver(hclog.New(&hclog.LoggerOptions{Name: t.Name(), Level: hclog.Debug, Output: testWriter{t}}))
	h := dtestutil.NewDriverHarness(t, d)
	pc := readmePluginConfig(t)
	pc.DataDir = dataDir
	for _, m := range mutate {
		m(&pc)
	}
	var raw []byte
	must.NoError(t, base.MsgPackEncode(&raw, &pc))
	topology := numalib.Scan(numalib.PlatformScanners(false))
	must.NoError(t, h.SetConfig(&base.Config{
		PluginConfig: raw,
		AgentConfig:  &base.AgentConfig{Driver: &base.ClientDriverConfig{Topology: topology}},
	}))
	td := &testDriver{DriverHarness: h, d: d, dataDir: dataDir}
	t.Cleanup(func() {
		d.Shutdown()
		for _, cleanup := range td.allocDirs {
			cleanup()
		}
	})
	return td
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

type taskOpt func(*drivers.TaskConfig, *TaskConfig)

func withMemory(mb int64) taskOpt {
	return func(c *drivers.TaskConfig, _ *TaskConfig) {
		c.Resources.NomadResources.Memory.MemoryMB = mb
		c.Resources.LinuxResources.MemoryLimitBytes = mb << 20
	}
}

// withPorts gives the allocation ports (label → host port, guest port) and forwards them.
func withPorts(ports map[string][2]int) taskOpt {
	return func(c *drivers.TaskConfig, tc *TaskConfig) {
		var alloc structs.AllocatedPorts
		for label, p := range ports {
			alloc = append(alloc, structs.AllocatedPortMapping{Label: label, Value: p[0], To: p[1]})
			tc.Ports = append(tc.Ports, label)
		}
		c.Resources.Ports = &alloc
	}
}

func withReadyTimeout(d string) taskOpt {
	return func(_ *drivers.TaskConfig, tc *TaskConfig) { tc.ReadyTimeout = d }
}

// newTask makes a task booting toplevel with initArgs and its alloc dir with logmon running.
func (td *testDriver) newTask(t *testing.T, name, toplevel string, initArgs []string, opts ...taskOpt) *drivers.TaskConfig {
	t.Helper()
	allocID := uuid.Generate()
	cfg := &drivers.TaskConfig{
		ID:      allocID + "/" + name + "/" + uuid.Generate()[:8],
		Name:    name,
		AllocID: allocID,
		JobName: "test",
		Resources: &drivers.Resources{
			NomadResources: &structs.AllocatedTaskResources{
				Memory: structs.AllocatedMemoryResources{MemoryMB: 256},
				Cpu:    structs.AllocatedCpuResources{CpuShares: 100},
			},
			LinuxResources: &drivers.LinuxResources{MemoryLimitBytes: 256 << 20, CPUShares: 100},
		},
	}
	tc := TaskConfig{Toplevel: toplevel, InitArgs: initArgs, ReadyTimeout: scaled(time.Minute).String(), PrivateUsers: "pick", RebootPolicy: "exit"}
	for _, o := range opts {
		o(cfg, &tc)
	}
	must.NoError(t, cfg.EncodeConcreteDriverConfig(&tc))
	td.allocDirs = append(td.allocDirs, td.MkAllocDir(cfg, true))
	return cfg
}

// start starts the task and destroys it when the test ends.
func (td *testDriver) start(t *testing.T, cfg *drivers.TaskConfig) *drivers.TaskHandle {
	t.Helper()
	handle, _, err := td.StartTask(cfg)
	must.NoError(t, err)
	t.Cleanup(func() { _ = td.d.DestroyTask(cfg.ID, true) })
	return handle
}

// machineDir is the directory of the machine of cfg.
func (td *testDriver) machineDir(t *testing.T, cfg *drivers.TaskConfig) string {
	t.Helper()
	m, err := td.d.machine(cfg.AllocID, cfg.Name)
	must.NoError(t, err)
	return m.dir
}

func (td *testDriver) waitExit(t *testing.T, taskID string, timeout time.Duration) *drivers.ExitResult {
	t.Helper()
	timeout = scaled(timeout)
	ch, err := td.WaitTask(context.Background(), taskID)
	must.NoError(t, err)
	select {
	case res := <-ch:
		must.NotNil(t, res)
		return res
	case <-time.After(timeout):
		t.Fatalf("task %s did not exit within %s", taskID, timeout)
		return nil
	}
}

// logs is what Nomad's logmon wrote for the task's stdout.
func logs(t *testing.T, cfg *drivers.TaskConfig) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(cfg.TaskDir().LogDir, cfg.Name+".stdout.0"))
	if os.IsNotExist(err) {
		return ""
	}
	must.NoError(t, err)
	return string(b)
}

// waitLog waits until the task's log contains want.
func waitLog(t *testing.T, cfg *drivers.TaskConfig, want string, timeout time.Duration) {
	t.Helper()
	timeout = scaled(timeout)
	err := wait.InitialSuccess(
		wait.BoolFunc(func() bool { return strings.Contains(logs(t, cfg), want) }),
		wait.Timeout(timeout), wait.Gap(100*time.Millisecond),
	).Run()
	if err != nil {
		t.Fatalf("log of %s never contained %q; it has:\n%s", cfg.Name, want, logs(t, cfg))
	}
}

// waitEvent waits for a task event whose message contains want.
func waitEvent(t testing.TB, events <-chan *drivers.TaskEvent, taskID, want string, timeout time.Duration) {
	t.Helper()
	timeout = scaled(timeout)
	deadline := time.After(timeout)
	for {
		select {
		case ev := <-events:
			if ev.TaskID == taskID && strings.Contains(ev.Message, want) {
				return
			}
		case <-deadline:
			t.Fatalf("no task event containing %q within %s", want, timeout)
		}
	}
}

func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	must.NoError(t, err, must.Sprintf("%s %v: %s", name, args, out))
	return string(out)
}

// leftovers lists what the inventory holds now and did not hold before.
func leftovers(t testing.TB, dataDir string, before []string) []string {
	t.Helper()
	seen := map[string]bool{}
	for _, item := range before {
		seen[item] = true
	}
	var out []string
	for _, item := range inventory(t, dataDir) {
		if !seen[item] {
			out = append(out, item)
		}
	}
	return out
}

// inventory lists what machines of this driver leave on the host: units, machines, veths,
// mounts and directories under the data dir.
// nixClosureRoots is where the driver roots closures in the host's Nix store.
const nixClosureRoots = "/nix/var/nix/gcroots/nomad-driver-nixos"

func inventory(t testing.TB, dataDir string) []string {
	t.Helper()
	var out []string
	for _, line := range strings.Split(run(t, "systemctl", "list-units", "--all", "--no-legend", "--plain", "nomad-*"), "\n") {
		if f := strings.Fields(line); len(f) > 0 {
			out = append(out, "unit "+f[0])
		}
	}
	for _, line := range strings.Split(run(t, "machinectl", "list", "--no-legend"), "\n") {
		if f := strings.Fields(line); len(f) > 0 && strings.HasPrefix(f[0], "nomad-") {
			out = append(out, "machine "+f[0])
		}
	}
	for _, line := range strings.Split(run(t, "ip", "-o", "link"), "\n") {
		if f := strings.Fields(line); len(f) > 1 && (strings.HasPrefix(f[1], "ve-nomad") || strings.HasPrefix(f[1], "vn-") || strings.HasPrefix(f[1], "vg-")) {
			out = append(out, "link "+f[1])
		}
	}
	mounts, err := os.ReadFile("/proc/self/mountinfo")
	must.NoError(t, err)
	for _, line := range strings.Split(string(mounts), "\n") {
		if f := strings.Fields(line); len(f) > 4 && strings.HasPrefix(f[4], dataDir) {
			out = append(out, "mount "+f[4])
		}
	}
	entries, _ := os.ReadDir(filepath.Join(dataDir, "machines"))
	for _, e := range entries {
		out = append(out, "dir "+e.Name())
	}
	staged, _ := os.ReadDir(credentialsRunDir)
	for _, e := range staged {
		out = append(out, "staged credentials "+e.Name())
	}
	forwarded, err := hostnet.ForwardedMachines()
	must.NoError(t, err)
	for m := range forwarded {
		out = append(out, "port forwards of "+m)
	}
	// GC roots (the host's Nix store's and the driver's own) and import staging.
	for _, d := range []string{"gcroots", "tmp", "store/.roots", "store/.tmp"} {
		entries, _ := os.ReadDir(filepath.Join(dataDir, d))
		for _, e := range entries {
			out = append(out, d+" "+e.Name())
		}
	}
	closureRoots, _ := os.ReadDir(nixClosureRoots)
	for _, e := range closureRoots {
		out = append(out, "closure root "+e.Name())
	}
	return out
}
