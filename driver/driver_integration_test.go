// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

//go:build integration

package driver

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/nomad/plugins/drivers"
	dtestutil "github.com/hashicorp/nomad/plugins/drivers/testutils"
	"github.com/shoenig/test/must"
	"github.com/shoenig/test/wait"

	"github.com/nomad-nixos/nomad-driver-nixos/hostnet"
	"github.com/nomad-nixos/nomad-driver-nixos/nspawn"
)

func TestExitCodes(t *testing.T) {
	td := newTestDriver(t, "")
	for _, code := range []int{0, 3} {
		t.Run(fmt.Sprint(code), func(t *testing.T) {
			cfg := td.newTask(t, fmt.Sprintf("exit%d", code), tinyToplevel(t), []string{fmt.Sprintf("exit=%d", code), "sleep=500ms"})
			td.start(t, cfg)
			// Several waiters, before and after the exit, all get the same result.
			early, err := td.WaitTask(context.Background(), cfg.ID)
			must.NoError(t, err)
			res := td.waitExit(t, cfg.ID, time.Minute)
			must.NoError(t, res.Err)
			must.Eq(t, code, res.ExitCode)
			must.Eq(t, 0, res.Signal)
			must.Eq(t, res, <-early)
			must.Eq(t, res, td.waitExit(t, cfg.ID, time.Second))
			waitLog(t, cfg, "tinyinit: ready", 5*time.Second)
		})
	}
	t.Run("PID 1 killed by a signal", func(t *testing.T) {
		cfg := td.newTask(t, "killed", tinyToplevel(t), nil)
		td.start(t, cfg)
		waitLog(t, cfg, "tinyinit: ready", 30*time.Second)
		must.NoError(t, td.SignalTask(cfg.ID, "SIGKILL"))
		res := td.waitExit(t, cfg.ID, time.Minute)
		must.NoError(t, res.Err)
		must.Eq(t, int(syscall.SIGKILL), res.Signal)
		must.Eq(t, 128+int(syscall.SIGKILL), res.ExitCode)
	})
	t.Run("reboot_policy restart boots again in place", func(t *testing.T) {
		cfg := td.newTask(t, "rebootin", tinyToplevel(t), []string{"reboot-once"}, func(_ *drivers.TaskConfig, tc *TaskConfig) {
			tc.RebootPolicy = string(nspawn.RebootRestart)
		})
		_, network, err := td.StartTask(cfg)
		must.NoError(t, err)
		t.Cleanup(func() { _ = td.d.DestroyTask(cfg.ID, true) })
		must.Wait(t, wait.InitialSuccess(
			wait.BoolFunc(func() bool { return strings.Count(logs(t, cfg), "tinyinit: ready") == 2 }),
			wait.Timeout(30*time.Second), wait.Gap(100*time.Millisecond),
		), must.Sprintf("the machine did not boot twice:\n%s", logs(t, cfg)))
		// nspawn made a new veth pair for the new boot; the driver addressed it again.
		machine := machineOf(t, cfg)
		must.Wait(t, wait.InitialSuccess(
			wait.BoolFunc(func() bool {
				leader, err := td.d.mgr.Leader(machine)
				if err != nil {
					return false
				}
				out, _ := exec.Command("nsenter", "-t", fmt.Sprint(leader), "-n", "ip", "-o", "addr", "show", "dev", hostnet.GuestInterface).Output()
				return strings.Contains(string(out), network.IP+"/30")
			}),
			wait.Timeout(10*time.Second), wait.Gap(100*time.Millisecond),
		), must.Sprint("the rebooted machine has no address"))
		status, err := td.InspectTask(cfg.ID)
		must.NoError(t, err)
		must.Eq(t, drivers.TaskStateRunning, status.State)
		must.NoError(t, td.StopTask(cfg.ID, 30*time.Second, ""))
		res := td.waitExit(t, cfg.ID, time.Minute)
		must.NoError(t, res.Err)
		must.Eq(t, 0, res.ExitCode)
	})
	t.Run("42 from systemctl exit in a systemd guest", func(t *testing.T) {
		cfg := td.newTask(t, "exit42", systemdToplevel(t), []string{"systemd.wants=exit42.service"})
		td.start(t, cfg)
		res := td.waitExit(t, cfg.ID, 2*time.Minute)
		must.NoError(t, res.Err)
		must.Eq(t, 42, res.ExitCode)
	})
	t.Run("reboot is exit 133 by default", func(t *testing.T) {
		cfg := td.newTask(t, "reboot", tinyToplevel(t), []string{"reboot", "exit=0"})
		td.start(t, cfg)
		res := td.waitExit(t, cfg.ID, time.Minute)
		must.Eq(t, nspawn.ExitReboot, res.ExitCode)
	})
}

// The community nspawn driver's most reported bug: a machine that ends at once loses its exit
// code and output.
func TestMachineThatExitsAtOnce(t *testing.T) {
	td := newTestDriver(t, "")
	for _, tc := range []struct {
		name string
		args []string
	}{
		{"after ready", []string{"print=fast-output", "exit=5"}},
		{"before ready", []string{"ready=no", "print=fast-output", "exit=5"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := td.newTask(t, "fast", tinyToplevel(t), tc.args)
			td.start(t, cfg)
			res := td.waitExit(t, cfg.ID, time.Minute)
			must.NoError(t, res.Err)
			must.Eq(t, 5, res.ExitCode)
			// The exit is reported only after the console was drained into Nomad's log pipe;
			// logmon writes the file a moment later.
			waitLog(t, cfg, "fast-output", 5*time.Second)
		})
	}
}

func TestReadyEventAndTimeout(t *testing.T) {
	td := newTestDriver(t, "")
	events, err := td.TaskEvents(context.Background())
	must.NoError(t, err)

	ready := td.newTask(t, "ready", tinyToplevel(t), nil)
	td.start(t, ready)
	waitEvent(t, events, ready.ID, "ready", 30*time.Second)

	never := td.newTask(t, "never", tinyToplevel(t), []string{"ready=no", "print=last-words"}, withReadyTimeout("2s"))
	td.start(t, never)
	res := td.waitExit(t, never.ID, time.Minute)
	must.Error(t, res.Err)
	must.StrContains(t, res.Err.Error(), "did not get ready within ready_timeout (2s)")
	must.StrContains(t, res.Err.Error(), "last-words")
}

func TestStop(t *testing.T) {
	td := newTestDriver(t, "")
	for _, guest := range []struct{ name, toplevel string }{
		{"systemd guest", systemdToplevel(t)},
		{"systemd 257 guest", fixture(t, "NIXOS_NSPAWN_SYSTEMD257_TOPLEVEL")},
	} {
		t.Run("orderly shutdown of a "+guest.name, func(t *testing.T) {
			cfg := td.newTask(t, "stopsd", guest.toplevel, nil)
			td.start(t, cfg)
			waitLog(t, cfg, "longrun: started", 2*time.Minute)
			// The mounts of the closure's paths take the drop-in of their units' name prefix.
			machine := mustMachine(t, cfg)
			var storeMounts []string
			for _, line := range strings.Split(run(t, "systemctl", "-M", machine, "list-units", "--type=mount", "--all", "--no-legend", "--plain", "nix-store-*"), "\n") {
				if f := strings.Fields(line); len(f) > 0 {
					storeMounts = append(storeMounts, f[0])
				}
			}
			must.SliceNotEmpty(t, storeMounts)
			shown := run(t, "systemctl", append([]string{"-M", machine, "show", "-p", "DefaultDependencies"}, storeMounts...)...)
			must.EqOp(t, len(storeMounts), strings.Count(shown, "DefaultDependencies=no"), must.Sprint(shown))
			must.NoError(t, td.StopTask(cfg.ID, time.Minute, ""))
			res := td.waitExit(t, cfg.ID, time.Minute)
			must.NoError(t, res.Err)
			must.Eq(t, 0, res.ExitCode, must.Sprintf("console:\n%s", logs(t, cfg)))
			must.Eq(t, 0, res.Signal)
			// The driver's binds are locked in the guest; unmounting them fails and, under
			// nspawn 257, loops until the kill.
			must.StrNotContains(t, logs(t, cfg), "Failed unmounting")
		})
	}
	t.Run("a guest that ignores the signal is killed after the timeout", func(t *testing.T) {
		cfg := td.newTask(t, "stubborn", tinyToplevel(t), []string{"ignore-stop"})
		td.start(t, cfg)
		waitLog(t, cfg, "tinyinit: ready", 30*time.Second)
		must.NoError(t, td.StopTask(cfg.ID, 2*time.Second, ""))
		res := td.waitExit(t, cfg.ID, time.Minute)
		must.Eq(t, int(syscall.SIGKILL), res.Signal)
		must.Eq(t, 128+int(syscall.SIGKILL), res.ExitCode)
		waitLog(t, cfg, "tinyinit: ignoring stop", 5*time.Second)
	})
}

// The stopping contract (README, "Stopping a task"): no kill_signal, SIGTERM and SIGINT are an
// orderly poweroff; any other signal reaches the guest's PID 1 alone, and the kill follows only
// after kill_timeout.
func TestStopContract(t *testing.T) {
	td := newTestDriver(t, "")
	for _, tc := range []struct {
		name   string
		signal string
		args   []string
	}{
		{"no kill_signal", "", nil},
		{"SIGTERM", "SIGTERM", nil},
		{"SIGINT", "SIGINT", nil},
		{"no kill_signal before READY", "", []string{"ready=no"}},
	} {
		t.Run(tc.name+" powers off", func(t *testing.T) {
			// The line is printed once PID 1 has its signal handlers.
			cfg := td.newTask(t, "off", tinyToplevel(t), append(tc.args, "print=handlers-set"))
			td.start(t, cfg)
			waitLog(t, cfg, "handlers-set", 30*time.Second)
			must.NoError(t, td.StopTask(cfg.ID, 30*time.Second, tc.signal))
			res := td.waitExit(t, cfg.ID, time.Minute)
			must.NoError(t, res.Err)
			must.Eq(t, 0, res.ExitCode)
			waitLog(t, cfg, "tinyinit: poweroff", 5*time.Second)
			must.StrNotContains(t, logs(t, cfg), "got signal")
		})
	}
	for _, tc := range []struct {
		name string
		args []string
	}{
		{"after READY", nil},
		{"before READY", []string{"ready=no"}},
	} {
		t.Run("SIGUSR1 "+tc.name+" is that signal, then the kill after kill_timeout", func(t *testing.T) {
			cfg := td.newTask(t, "usr1", tinyToplevel(t), append(tc.args, "print=handlers-set"))
			td.start(t, cfg)
			waitLog(t, cfg, "handlers-set", 30*time.Second)
			const timeout = 3 * time.Second
			began := time.Now()
			stopped := make(chan error, 1)
			go func() { stopped <- td.StopTask(cfg.ID, timeout, "SIGUSR1") }()
			waitLog(t, cfg, "tinyinit: got signal SIGUSR1", 5*time.Second)
			time.Sleep(time.Until(began.Add(timeout / 2)))
			status, err := td.InspectTask(cfg.ID)
			must.NoError(t, err)
			must.Eq(t, drivers.TaskStateRunning, status.State, must.Sprintf("the machine ended before kill_timeout:\n%s", logs(t, cfg)))
			must.NoError(t, <-stopped)
			must.GreaterEq(t, timeout, time.Since(began))
			res := td.waitExit(t, cfg.ID, time.Minute)
			must.Eq(t, int(syscall.SIGKILL), res.Signal, must.Sprintf("exit %+v\n%s", res, logs(t, cfg)))
			must.StrNotContains(t, logs(t, cfg), "tinyinit: poweroff")
			must.EqOp(t, 1, strings.Count(logs(t, cfg), "got signal SIGUSR1"))
		})
	}
}

func TestOOMKilled(t *testing.T) {
	td := newTestDriver(t, "")
	events, err := td.TaskEvents(context.Background())
	must.NoError(t, err)
	t.Run("a guest service, then the guest fails", func(t *testing.T) {
		cfg := td.newTask(t, "oom", systemdToplevel(t), []string{"systemd.wants=hog.service"}, withMemory(128))
		td.start(t, cfg)
		res := td.waitExit(t, cfg.ID, 2*time.Minute)
		must.NoError(t, res.Err)
		must.True(t, res.OOMKilled, must.Sprintf("exit %+v", res))
		must.Eq(t, 137, res.ExitCode)
		waitEvent(t, events, cfg.ID, "OOM killer", 10*time.Second)
	})
	t.Run("the guest's PID 1", func(t *testing.T) {
		// The machine and its cgroup are gone within milliseconds of the kill.
		cfg := td.newTask(t, "oompid1", tinyToplevel(t), []string{"hog"}, withMemory(64))
		td.start(t, cfg)
		res := td.waitExit(t, cfg.ID, 2*time.Minute)
		must.NoError(t, res.Err)
		must.True(t, res.OOMKilled, must.Sprintf("exit %+v", res))
		must.Eq(t, int(syscall.SIGKILL), res.Signal)
	})
}

func TestStatsSignalExec(t *testing.T) {
	td := newTestDriver(t, "")
	cfg := td.newTask(t, "busy", systemdToplevel(t), nil)
	td.start(t, cfg)
	waitLog(t, cfg, "longrun: started", 2*time.Minute)

	t.Run("stats", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		// Burn CPU inside the machine while sampling.
		go func() {
			_, _ = td.ExecTask(cfg.ID, []string{"/usr/bin/timeout", "8", "/bin/sh", "-c", "while :; do :; done"}, 20*time.Second)
		}()
		stats, err := td.TaskStats(ctx, cfg.ID, 500*time.Millisecond)
		must.NoError(t, err)
		var sawCPU, sawMem bool
		deadline := time.After(15 * time.Second)
		for !(sawCPU && sawMem) {
			select {
			case s := <-stats:
				must.NotNil(t, s)
				mem, cpu := s.ResourceUsage.MemoryStats, s.ResourceUsage.CpuStats
				sawMem = sawMem || (mem.Usage > 0 && mem.RSS > 0)
				sawCPU = sawCPU || (cpu.Percent > 0 && cpu.TotalTicks > 0 && cpu.UserMode+cpu.SystemMode > 0)
			case <-deadline:
				t.Fatalf("no sample with CPU and memory use (cpu %v, memory %v)", sawCPU, sawMem)
			}
		}
	})

	t.Run("exec", func(t *testing.T) {
		res, err := td.ExecTask(cfg.ID, []string{"/bin/sh", "-c", "echo out; echo err >&2; exit 3"}, 30*time.Second)
		must.NoError(t, err)
		must.Eq(t, 3, res.ExitResult.ExitCode)
		must.Eq(t, "out\n", string(res.Stdout))
		must.Eq(t, "err\n", string(res.Stderr))
		// Runs inside the guest: its PID 1 is the guest's systemd.
		res, err = td.ExecTask(cfg.ID, []string{"/bin/cat", "/proc/1/comm"}, 30*time.Second)
		must.NoError(t, err)
		must.Eq(t, "systemd\n", string(res.Stdout))
	})

	t.Run("exec streaming with and without TTY", func(t *testing.T) {
		dtestutil.TestExecTaskStreamingBasicResponses(t, dtestutil.NewDriverHarness(t, servedExec{td.d}), cfg.ID)
	})

	t.Run("an interactive shell on a TTY has job control and its exit status", func(t *testing.T) {
		code, stdout, _ := dtestutil.ExecTask(t, td.DriverHarness, cfg.ID, "exec /bin/sh -i", true, "echo pgrp=$$; exit 5\n")
		must.Eq(t, 5, code, must.Sprint(stdout))
		must.StrNotContains(t, stdout, "Cannot set tty process group")
		must.StrContains(t, stdout, "pgrp=")
	})

	t.Run("environment file for guest services", func(t *testing.T) {
		waitLog(t, cfg, "envcheck: NOMAD_TASK_NAME=busy", 30*time.Second)
	})

	t.Run("host tools see the machine", func(t *testing.T) {
		machine := mustMachine(t, cfg)
		must.StrContains(t, run(t, "machinectl", "list", "--no-legend"), machine)
		must.StrContains(t, run(t, "systemctl", "-M", machine, "is-active", "longrun.service"), "active")
		must.StrContains(t, run(t, "journalctl", "-M", machine, "--no-pager", "-u", "longrun.service"), "longrun: started")
	})

	t.Run("limits on the unit", func(t *testing.T) {
		out := run(t, "systemctl", "show", "-p", "MemoryMax", "-p", "CPUWeight", "-p", "TasksMax", "-p", "Delegate", "-p", "KillMode", nspawn.UnitName(mustMachine(t, cfg)))
		must.StrContains(t, out, fmt.Sprintf("MemoryMax=%d", 256<<20))
		must.StrContains(t, out, fmt.Sprintf("CPUWeight=%d", cpuWeight(100)))
		must.StrContains(t, out, fmt.Sprintf("TasksMax=%d", defaultTasksMax))
		must.StrContains(t, out, "KillMode=mixed")
	})
}

func mustMachine(t *testing.T, cfg *drivers.TaskConfig) string {
	t.Helper()
	m, err := nspawn.MachineName(cfg.AllocID, cfg.Name)
	must.NoError(t, err)
	return m
}

// machineOfTaskID is the machine name of a task ID.
func machineOfTaskID(t testing.TB, taskID string) string {
	t.Helper()
	allocID, task, err := taskOfID(taskID)
	must.NoError(t, err)
	m, err := nspawn.MachineName(allocID, task)
	must.NoError(t, err)
	return m
}

func TestSignalReachesGuestPID1(t *testing.T) {
	td := newTestDriver(t, "")
	cfg := td.newTask(t, "sig", tinyToplevel(t), nil)
	td.start(t, cfg)
	waitLog(t, cfg, "tinyinit: ready", 30*time.Second)
	must.NoError(t, td.SignalTask(cfg.ID, "SIGUSR1"))
	waitLog(t, cfg, "tinyinit: got signal SIGUSR1", 10*time.Second)
	must.Error(t, td.SignalTask(cfg.ID, "SIGNOPE"))
}

// Machines always run in a user namespace of a range picked by nspawn, never the host's IDs.
func TestUserNamespace(t *testing.T) {
	td := newTestDriver(t, "")
	cfg := td.newTask(t, "userns", tinyToplevel(t), nil)
	td.start(t, cfg)
	waitLog(t, cfg, "tinyinit: ready", 30*time.Second)
	leader, err := td.d.mgr.Leader(mustMachine(t, cfg))
	must.NoError(t, err)
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/uid_map", leader))
	must.NoError(t, err)
	f := strings.Fields(string(b))
	must.Len(t, 3, f, must.Sprintf("uid_map: %q", b))
	base, err := strconv.Atoi(f[1])
	must.NoError(t, err)
	must.Eq(t, "0", f[0])
	must.GreaterEq(t, userRangeFirst, base)
	must.Eq(t, fmt.Sprint(userRangeSize), f[2])
}

func TestDirsAndEnvironment(t *testing.T) {
	td := newTestDriver(t, "")
	cfg := td.newTask(t, "dirs", tinyToplevel(t), []string{"files", "env=NOMAD_TASK_NAME", "env=NOMAD_ALLOC_DIR", "exit=0"})
	td.start(t, cfg)
	res := td.waitExit(t, cfg.ID, time.Minute)
	must.Eq(t, 0, res.ExitCode)
	waitLog(t, cfg, "tinyinit env NOMAD_ALLOC_DIR", 5*time.Second)
	out := logs(t, cfg)
	must.StrContains(t, out, "tinyinit: alloc=yes local=yes secrets=yes")
	must.StrContains(t, out, "tinyinit: store-ro=yes")
	must.StrContains(t, out, "tinyinit env NOMAD_TASK_NAME=dirs")
	must.StrContains(t, out, "tinyinit env NOMAD_ALLOC_DIR=/alloc")
	env, err := os.ReadFile(filepath.Join(cfg.TaskDir().SecretsDir, envFileName))
	must.NoError(t, err)
	must.StrContains(t, string(env), `NOMAD_TASK_NAME="dirs"`)
}

// The console goes to a file first: a machine never blocks on a missing log reader, and a reader
// that comes late still gets every line, once.
func TestConsoleWithoutReader(t *testing.T) {
	td := newTestDriver(t, "")
	const lines = 2000
	cfg := td.newTask(t, "noreader", tinyToplevel(t), []string{fmt.Sprintf("lines=%d", lines), "exit=0"})
	fifo := filepath.Join(t.TempDir(), "stdout.fifo")
	must.NoError(t, syscall.Mkfifo(fifo, 0o600))
	cfg.StdoutPath = fifo
	td.start(t, cfg)

	unit := nspawn.UnitName(mustMachine(t, cfg))
	must.Wait(t, wait.InitialSuccess(
		wait.BoolFunc(func() bool {
			st, err := td.d.mgr.Status(context.Background(), unit)
			return err == nil && !st.Running()
		}),
		wait.Timeout(30*time.Second), wait.Gap(100*time.Millisecond),
	), must.Sprint("the machine did not end while its console had no reader"))

	reader, err := os.Open(fifo)
	must.NoError(t, err)
	defer reader.Close()
	out, err := io.ReadAll(reader)
	must.NoError(t, err)
	for i := 1; i <= lines; i++ {
		must.Eq(t, 1, strings.Count(string(out), fmt.Sprintf("tinyinit line %d\n", i)), must.Sprintf("line %d", i))
	}
	res := td.waitExit(t, cfg.ID, time.Minute)
	must.NoError(t, res.Err)
	must.Eq(t, 0, res.ExitCode)
}

// A plugin that dies and comes back re-attaches to the running machine, and a later exit, or one
// that happened while it was down, is reported exactly, with the console neither lost nor repeated.
func TestRecoverAfterPluginRestart(t *testing.T) {
	dataDir := t.TempDir()
	for _, tc := range []struct {
		name     string
		downtime time.Duration
	}{
		{"exit after recovery", 0},
		{"exit while the plugin is down", 4 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			td := newTestDriver(t, dataDir)
			cfg := td.newTask(t, "recover", tinyToplevel(t), []string{"exit=9", "sleep=3s"})
			handle, _, err := td.StartTask(cfg)
			must.NoError(t, err)
			waitLog(t, cfg, "tinyinit: ready", 30*time.Second)
			leader, err := td.d.mgr.Leader(mustMachine(t, cfg))
			must.NoError(t, err)

			td.d.Shutdown()
			td.Kill()
			// Console output while no plugin runs must still reach the log.
			must.NoError(t, syscall.Kill(leader, syscall.SIGUSR1))
			time.Sleep(tc.downtime)

			td2 := newTestDriver(t, dataDir)
			must.NoError(t, td2.RecoverTask(handle))
			t.Cleanup(func() { _ = td2.d.DestroyTask(cfg.ID, true) })
			res := td2.waitExit(t, cfg.ID, time.Minute)
			must.NoError(t, res.Err)
			must.Eq(t, 9, res.ExitCode)
			waitLog(t, cfg, "tinyinit: got signal SIGUSR1", 5*time.Second)
			out := logs(t, cfg)
			must.Eq(t, 1, strings.Count(out, "tinyinit: started"), must.Sprintf("log:\n%s", out))
			must.Eq(t, 1, strings.Count(out, "tinyinit: got signal SIGUSR1"), must.Sprintf("log:\n%s", out))
		})
	}
}

func TestDestroyWithoutState(t *testing.T) {
	dataDir := t.TempDir()
	td := newTestDriver(t, dataDir)
	before := inventory(t, dataDir)
	cfg := td.newTask(t, "orphan", tinyToplevel(t), nil)
	_, _, err := td.StartTask(cfg)
	must.NoError(t, err)
	// The drivers of this test cannot clean up once it failed half way; systemd can.
	machine := machineOf(t, cfg)
	t.Cleanup(func() {
		_ = exec.Command("systemctl", "stop", nspawn.UnitName(machine), nspawn.ConsoleUnit(machine)).Run()
	})
	waitLog(t, cfg, "tinyinit: ready", 30*time.Second)
	// unit, forwarder unit, machine, veth, directory, the machine's root and its closure's
	must.Len(t, 7, leftovers(t, dataDir, before), must.Sprint(leftovers(t, dataDir, before)))

	td.d.Shutdown()
	td.Kill()
	fresh := newTestDriver(t, dataDir)
	must.NoError(t, fresh.d.DestroyTask(cfg.ID, true))
	must.SliceEmpty(t, leftovers(t, dataDir, before), must.Sprint(leftovers(t, dataDir, before)))
}

// A unit of the machine's name that another allocation owns is left alone: the start fails,
// naming it, and the unit keeps running.
func TestStartLeavesAnotherAllocationsUnit(t *testing.T) {
	td := newTestDriver(t, "")
	cfg := td.newTask(t, "foreign", tinyToplevel(t), nil)
	unit := nspawn.UnitName(mustMachine(t, cfg))
	out, err := exec.Command("systemd-run", "--quiet", "--unit="+unit, "-p", "Description=another allocation's machine",
		"sleep", "600").CombinedOutput()
	must.NoError(t, err, must.Sprint(string(out)))
	t.Cleanup(func() { _ = exec.Command("systemctl", "stop", unit).Run() })

	_, _, err = td.StartTask(cfg)
	must.ErrorContains(t, err, "unit "+unit+" belongs to another allocation")
	state, _ := exec.Command("systemctl", "is-active", unit).Output()
	must.EqOp(t, "active\n", string(state))
}

func TestFingerprint(t *testing.T) {
	t.Run("healthy", func(t *testing.T) {
		td := newTestDriver(t, "")
		fp := firstFingerprint(t, td)
		must.Eq(t, drivers.HealthStateHealthy, fp.Health, must.Sprint(fp.HealthDescription))
		for _, attr := range []string{"version", "systemd_version", "cgroup_mode", "machined", "networkd", "ip_forward", "store", "nix_version", "bridge", "inotify_instances"} {
			_, ok := fp.Attributes[attrPrefix+attr]
			must.True(t, ok, must.Sprintf("missing attribute %s", attr))
		}
		// The test host has Nix and a writable /nix/store, so "auto" takes the host's store.
		store, _ := fp.Attributes[attrPrefix+"store"].GetString()
		must.EqOp(t, "host", store)
		// The test host runs no systemd-networkd, which veth machines do not need.
		state, _ := exec.Command("systemctl", "is-active", "systemd-networkd.service").Output()
		must.Eq(t, "inactive\n", string(state))
		networkd, _ := fp.Attributes[attrPrefix+"networkd"].GetBool()
		must.False(t, networkd)
		must.StrNotContains(t, fp.HealthDescription, "networkd")
		// IP forwarding is the build machine's: the warning follows it.
		fwd, err := os.ReadFile("/proc/sys/net/ipv4/ip_forward")
		must.NoError(t, err)
		forwarding, _ := fp.Attributes[attrPrefix+"ip_forward"].GetBool()
		must.EqOp(t, strings.TrimSpace(string(fwd)) == "1", forwarding)
		if !forwarding {
			must.StrContains(t, fp.HealthDescription, "Healthy; warning: IPv4 forwarding is off, so veth machines reach only the host")
		}
		// Bridge mode follows the CNI plugins of the default cni_path (the VM host has Debian's).
		bridge, _ := fp.Attributes[attrPrefix+"bridge"].GetBool()
		_, cniErr := os.Stat("/usr/lib/cni/bridge")
		must.EqOp(t, cniErr == nil, bridge)
		if !bridge {
			// After the forwarding warning, if there is one.
			must.StrContains(t, fp.HealthDescription, "Healthy; warning: ")
			must.StrContains(t, fp.HealthDescription, "bridge mode unavailable: the CNI plugins bridge, firewall, host-local, loopback, portmap are not in cni_path")
		}
		// The kernel's inotify limit: the test host's machine has it raised by e2e/lib/host.sh, the VM
		// host keeps Debian's 128.
		raw, err := os.ReadFile("/proc/sys/fs/inotify/max_user_instances")
		must.NoError(t, err)
		limit, _ := fp.Attributes[attrPrefix+"inotify_instances"].GetInt()
		must.EqOp(t, strings.TrimSpace(string(raw)), strconv.FormatInt(limit, 10))
		roomy := limit >= 1024
		if !roomy {
			must.StrContains(t, fp.HealthDescription, fmt.Sprintf("fs.inotify.max_user_instances is %d, and each NixOS machine takes about 8 of root's, so about %d fit; raise it to 1024 or more", limit, limit/8))
		}
		if forwarding && bridge && roomy {
			must.EqOp(t, drivers.DriverHealthy, fp.HealthDescription)
		}
	})
	t.Run("unhealthy without systemd on the bus", func(t *testing.T) {
		t.Setenv("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent/system_bus_socket")
		td := newTestDriver(t, "")
		fp := firstFingerprint(t, td)
		must.Eq(t, drivers.HealthStateUnhealthy, fp.Health)
		must.StrContains(t, fp.HealthDescription, "systemd is not reachable over D-Bus")
		must.StrContains(t, fp.HealthDescription, "systemd-machined is not reachable")
	})
	t.Run("unhealthy without nspawn", func(t *testing.T) {
		td := newTestDriver(t, "", func(c *PluginConfig) { c.NspawnPath = "/nonexistent/systemd-nspawn" })
		fp := firstFingerprint(t, td)
		must.Eq(t, drivers.HealthStateUnhealthy, fp.Health)
		must.StrContains(t, fp.HealthDescription, "nspawn_path: no executable at /nonexistent/systemd-nspawn")
	})
}

func firstFingerprint(t *testing.T, td *testDriver) *drivers.Fingerprint {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ch, err := td.Fingerprint(ctx)
	must.NoError(t, err)
	select {
	case fp := <-ch:
		return fp
	case <-time.After(10 * time.Second):
		t.Fatal("no fingerprint within 10s")
		return nil
	}
}

func TestBadConfigLeavesNothing(t *testing.T) {
	dataDir := t.TempDir()
	td := newTestDriver(t, dataDir)
	before := inventory(t, dataDir)
	for _, tc := range []struct {
		name, toplevel, want string
		args                 []string
	}{
		{"not a store path", "/etc", `toplevel = "/etc": must be a Nix store path: "/etc" is not in /nix/store`, nil},
		{"a profile link", "", "a symbolic link, and the driver does not follow links; give the store path it points to, as `readlink -f", nil},
		{"missing", "/nix/store/00000000000000000000000000000000-nixos-system-gone", "is not in the host's Nix store and the host's Nix could not realise it", nil},
		{"has a kernel", "", "has a kernel", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			toplevel := tc.toplevel
			switch tc.name {
			case "has a kernel":
				toplevel = fixture(t, "NIXOS_NSPAWN_KERNEL_TOPLEVEL")
			case "a profile link":
				toplevel = filepath.Join(t.TempDir(), "web")
				must.NoError(t, os.Symlink(tinyToplevel(t), toplevel))
			}
			cfg := td.newTask(t, "bad", toplevel, tc.args)
			_, _, err := td.StartTask(cfg)
			must.ErrorContains(t, err, tc.want)
			must.SliceEmpty(t, leftovers(t, dataDir, before), must.Sprint(leftovers(t, dataDir, before)))
		})
	}
}

// Init args and environment values reach the guest byte for byte: systemd expands neither $
// nor %, and journald takes no "<4>" at the start of a console line for a log level.
func TestArgsAndEnvByteForByte(t *testing.T) {
	td := newTestDriver(t, "")
	words := []string{"$X", "${X}", "$PATH", "${PATH}", "D:$$", "%n", "%%", "%i %H", `end\`, `\$X`, "$(touch /tmp/x)", "'$X' \"$X\""}
	cfg := td.newTask(t, "dollar", tinyToplevel(t), wordArgs(words, "print=<4>not a log level", "env=SECRET", "env=PLAIN", "exit=0"), func(c *drivers.TaskConfig, _ *TaskConfig) {
		c.Env = map[string]string{"SECRET": "pa$$word ${X} %n \\", "PLAIN": "$PATH"}
	})
	td.start(t, cfg)
	res := td.waitExit(t, cfg.ID, time.Minute)
	must.Eq(t, 0, res.ExitCode)
	want := append(wordLines(words), "<4>not a log level", "tinyinit env SECRET=pa$$word ${X} %n \\", "tinyinit env PLAIN=$PATH")
	for _, w := range want {
		waitLine(t, cfg, w, 1)
	}
}

// A unit whose command systemd may keep as ExecStart= survives a daemon-reload, which rewrites
// it from the unit file: an in-place reboot afterwards runs the same command, specifiers and all.
func TestArgsSurviveDaemonReload(t *testing.T) {
	td := newTestDriver(t, "")
	words := []string{"%n", "%%", "%i %H", `a\b`, "'q' \"qq\""}
	cfg := td.newTask(t, "reload", tinyToplevel(t), wordArgs(words, "reboot-once", "sleep=3s"), func(_ *drivers.TaskConfig, tc *TaskConfig) {
		tc.RebootPolicy = string(nspawn.RebootRestart)
	})
	td.start(t, cfg)
	waitLog(t, cfg, "tinyinit: ready", 30*time.Second)
	run(t, "systemctl", "daemon-reload")
	for _, w := range wordLines(words) {
		waitLine(t, cfg, w, 2)
	}
	must.NoError(t, td.StopTask(cfg.ID, 30*time.Second, ""))
	td.waitExit(t, cfg.ID, time.Minute)
}

// wordArgs makes tinyinit print each word on a line of its own, numbered, then applies settings.
func wordArgs(words []string, settings ...string) []string {
	var args []string
	for i, w := range words {
		args = append(args, fmt.Sprintf("print=[%d]%s", i, w))
	}
	return append(args, settings...)
}

func wordLines(words []string) []string {
	var lines []string
	for i, w := range words {
		lines = append(lines, fmt.Sprintf("[%d]%s", i, w))
	}
	return lines
}

// waitLine waits until the task's log has the line exactly n times.
func waitLine(t *testing.T, cfg *drivers.TaskConfig, line string, n int) {
	t.Helper()
	count := func() int { return strings.Count("\n"+logs(t, cfg), "\n"+line+"\n") }
	err := wait.InitialSuccess(
		wait.BoolFunc(func() bool { return count() == n }),
		wait.Timeout(30*time.Second), wait.Gap(100*time.Millisecond),
	).Run()
	if err != nil {
		t.Fatalf("log of %s has the line %q %d times, not %d:\n%s", cfg.Name, line, count(), n, logs(t, cfg))
	}
}

// Variables that cannot be given to the machine are named in a task event, not dropped silently.
func TestLeftOutEnvironmentIsReported(t *testing.T) {
	td := newTestDriver(t, "")
	events, err := td.TaskEvents(context.Background())
	must.NoError(t, err)
	cfg := td.newTask(t, "leftout", tinyToplevel(t), []string{"env=NOMAD_META_team_name", "exit=0"}, func(c *drivers.TaskConfig, _ *TaskConfig) {
		c.Env = map[string]string{"NOMAD_META_team.name": "infra", "NOMAD_META_team_name": "infra", "NOTIFY_SOCKET": "/x"}
	})
	td.start(t, cfg)
	waitEvent(t, events, cfg.ID, `Environment variables not given to the machine: "NOMAD_META_team.name" (systemd takes only names of letters, digits and '_', not starting with a digit), "NOTIFY_SOCKET" (nspawn or the guest's systemd gives it a meaning of its own)`, 10*time.Second)
	must.Eq(t, 0, td.waitExit(t, cfg.ID, time.Minute).ExitCode)
	waitLine(t, cfg, "tinyinit env NOMAD_META_team_name=infra", 1)
}

// A toplevel with a trailing slash is the store path without it.
func TestToplevelTrailingSlash(t *testing.T) {
	td := newTestDriver(t, "")
	cfg := td.newTask(t, "slash", tinyToplevel(t)+"/", []string{"print=slash-ok", "exit=0"})
	td.start(t, cfg)
	res := td.waitExit(t, cfg.ID, time.Minute)
	must.NoError(t, res.Err)
	must.Eq(t, 0, res.ExitCode)
	waitLog(t, cfg, "slash-ok", 5*time.Second)
}

// Many tasks at once share the driver's bus connection, which no single call may close.
func TestConcurrentStarts(t *testing.T) {
	td := newTestDriver(t, "")
	// The fingerprint's own short timeout once closed the shared connection under the tasks.
	firstFingerprint(t, td)
	const n = 6
	cfgs := make([]*drivers.TaskConfig, n)
	for i := range cfgs {
		cfgs[i] = td.newTask(t, fmt.Sprintf("par%d", i), tinyToplevel(t), []string{"exit=0", "sleep=1s"})
	}
	errs := make(chan error, n)
	for _, cfg := range cfgs {
		go func() {
			_, _, err := td.StartTask(cfg)
			errs <- err
		}()
	}
	for range cfgs {
		must.NoError(t, <-errs)
	}
	for _, cfg := range cfgs {
		t.Cleanup(func() { _ = td.d.DestroyTask(cfg.ID, true) })
		res := td.waitExit(t, cfg.ID, time.Minute)
		must.NoError(t, res.Err)
		must.Eq(t, 0, res.ExitCode)
	}
}

// Start and destroy machines over and over: nothing may pile up.
func TestCyclesLeaveNothing(t *testing.T) {
	dataDir := t.TempDir()
	td := newTestDriver(t, dataDir)
	before := inventory(t, dataDir)
	for i := 0; i < 20; i++ {
		cfg := td.newTask(t, fmt.Sprintf("cycle%d", i), tinyToplevel(t), nil, withPorts(map[string][2]int{"http": {freePort(t), 80}}))
		td.start(t, cfg)
		must.NoError(t, td.StopTask(cfg.ID, 10*time.Second, ""))
		res := td.waitExit(t, cfg.ID, 30*time.Second)
		must.Eq(t, 0, res.ExitCode)
		must.NoError(t, td.DestroyTask(cfg.ID, true))
	}
	must.Wait(t, wait.InitialSuccess(
		wait.BoolFunc(func() bool { return len(leftovers(t, dataDir, before)) == 0 }),
		wait.Timeout(10*time.Second), wait.Gap(200*time.Millisecond),
	), must.Sprintf("left behind: %v", leftovers(t, dataDir, before)))
}

// Long console lines arrive whole (journalctl's JSON once dropped fields over 4 KiB).
func TestLongConsoleLine(t *testing.T) {
	td := newTestDriver(t, "")
	long := strings.Repeat("0123456789", 1000)
	cfg := td.newTask(t, "long", tinyToplevel(t), []string{"print=" + long, "exit=0"})
	td.start(t, cfg)
	td.waitExit(t, cfg.ID, 30*time.Second)
	waitLog(t, cfg, long, 10*time.Second)
}

// servedExec runs an exec stream as Nomad's plugin server does: it waits until the output has
// been sent before it sends the exit. Nomad's shared exec cases, given a driver without
// ExecTaskStreamingRaw, read their result as soon as ExecTaskStreaming returns, before their own
// goroutines have sent the last output on (on a loaded machine a TTY case found it empty).
type servedExec struct{ *Driver }

func (s servedExec) ExecTaskStreamingRaw(ctx context.Context, taskID string, command []string, tty bool, stream drivers.ExecTaskStream) error {
	opts, sent := drivers.StreamToExecOptions(ctx, command, tty, stream)
	res, err := s.ExecTaskStreaming(ctx, taskID, opts)
	if err != nil {
		return err
	}
	if err := <-sent; err != nil {
		return err
	}
	return stream.Send(drivers.NewExecStreamingResponseExit(res.ExitCode))
}
