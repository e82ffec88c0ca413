// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

//go:build integration

package driver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/shoenig/test/must"

	"github.com/nomad-nixos/nomad-driver-nixos/nspawn"
)

// concurrentTasks is how many tasks BenchmarkConcurrency starts and stops at once.
const concurrentTasks = 10

// Ten tasks of the tiny fixture started at once until all are READY, then stopped at once until
// all are gone (StopTask and DestroyTask), against one task started and stopped alone; and the
// same for bare systemd-run + nspawn starts and systemctl stops, which show what the host itself
// allows. All take turns in the same run. Beside the times it reports the CPU the host spent:
// ten things done at once cannot take less than ten times the CPU of one spread over the host's
// cores, and systemd (PID 1) does its part of every start and stop on one thread.
func BenchmarkConcurrency(b *testing.B) {
	toplevel := fixture(b, "NIXOS_NSPAWN_TINY_TOPLEVEL")
	d := benchNewDriver(b)
	defer d.Shutdown()
	ready := followReadiness(b, d)
	var one, many, bareOne, bareMany startStop
	for i := 0; i < b.N; i++ {
		one.add(startStopAtOnce(b, d, ready, toplevel, fmt.Sprintf("one%d", i), 1))
		many.add(startStopAtOnce(b, d, ready, toplevel, fmt.Sprintf("many%d", i), concurrentTasks))
		bareOne.add(bareStartStopAtOnce(b, toplevel, fmt.Sprintf("bareone%d", i), 1))
		bareMany.add(bareStartStopAtOnce(b, toplevel, fmt.Sprintf("baremany%d", i), concurrentTasks))
	}
	cores := float64(runtime.NumCPU())
	for _, r := range []struct {
		name      string
		one, many startStop
	}{{"driver", one, many}, {"bare", bareOne, bareMany}} {
		for _, w := range []struct {
			name      string
			one, many spent
		}{{"start", r.one.start, r.many.start}, {"stop", r.one.stop, r.many.stop}} {
			n := time.Duration(b.N)
			each := fmt.Sprintf("%s-%s", r.name, w.name)
			ten := fmt.Sprintf("%s-%d", each, concurrentTasks)
			reportMs(b, w.one.wall/n, each+"-1-ms")
			reportMs(b, w.many.wall/n, ten+"-ms")
			b.ReportMetric(float64(w.many.wall)/float64(w.one.wall), ten+"/1")
			reportMs(b, w.one.busy/n, each+"-1-CPU-ms")
			reportMs(b, w.many.busy/n/concurrentTasks, ten+"-CPU-ms/machine")
			b.ReportMetric(float64(w.many.busy)/float64(w.many.wall), ten+"-cores-busy")
			b.ReportMetric(float64(w.many.pid1)/float64(w.many.wall), ten+"-systemd-busy")
		}
	}
	// The least time ten bare starts and stops could take, doing ten times the work of one:
	// spread over these cores, and systemd's part on its one thread however many cores there
	// were. Not for the driver: its console forwarder starts once the machine is READY, so a
	// lone task's stop holds that start, and ten starts at once hold the first ones'.
	for _, w := range []struct {
		name string
		one  spent
	}{{"start", bareOne.start}, {"stop", bareOne.stop}} {
		ten := fmt.Sprintf("bare-%s-%d", w.name, concurrentTasks)
		b.ReportMetric(concurrentTasks*float64(w.one.busy)/cores/float64(w.one.wall), ten+"-least/1")
		b.ReportMetric(concurrentTasks*float64(w.one.pid1)/float64(w.one.wall), ten+"-least-systemd/1")
	}
	b.ReportMetric(0, "ns/op")
}

// spent is what a stretch of a benchmark took: its wall time, the CPU time of the whole host and
// that of systemd (PID 1).
type spent struct{ wall, busy, pid1 time.Duration }

func (s spent) plus(o spent) spent {
	return spent{wall: s.wall + o.wall, busy: s.busy + o.busy, pid1: s.pid1 + o.pid1}
}

// measure runs f and returns what it took.
func measure(b *testing.B, f func()) spent {
	busy, pid1 := hostBusy(b), runTime(b, 1)
	t0 := time.Now()
	f()
	return spent{wall: time.Since(t0), busy: hostBusy(b) - busy, pid1: runTime(b, 1) - pid1}
}

// hostBusy is the CPU time the host has spent since it booted (user, nice, system, irq and
// softirq time in /proc/stat, which no namespace hides), in clock ticks (USER_HZ, 100 on Linux).
func hostBusy(b *testing.B) time.Duration {
	raw, err := os.ReadFile("/proc/stat")
	must.NoError(b, err)
	total, _, _ := strings.Cut(string(raw), "\n")
	f := strings.Fields(total)
	must.EqOp(b, "cpu", f[0])
	var ticks int64
	for _, field := range []int{1, 2, 3, 6, 7} {
		n, err := strconv.ParseInt(f[field], 10, 64)
		must.NoError(b, err)
		ticks += n
	}
	return time.Duration(ticks) * 10 * time.Millisecond
}

// startStop sums what starts and stops took.
type startStop struct{ start, stop spent }

func (s *startStop) add(o startStop) {
	s.start = s.start.plus(o.start)
	s.stop = s.stop.plus(o.stop)
}

// bareStartStopAtOnce starts n bare machines at once until all are READY, then stops them at once
// with systemctl stop, and returns what each took.
func bareStartStopAtOnce(b *testing.B, toplevel, name string, n int) startStop {
	names := make([]string, n)
	roots := make([]string, n)
	for i := range names {
		names[i] = fmt.Sprintf("%s-%d", name, i)
		roots[i] = filepath.Join(b.TempDir(), "root")
		must.NoError(b, nspawn.PrepareRoot(roots[i]))
	}
	var took startStop
	took.start = measure(b, func() {
		must.NoError(b, eachAtOnce(n, func(i int) error { return bareStart(names[i], roots[i], toplevel, "--network-veth") }))
	})
	took.stop = measure(b, func() {
		must.NoError(b, eachAtOnce(n, func(i int) error {
			if out, err := exec.Command("systemctl", "stop", names[i]).CombinedOutput(); err != nil {
				return fmt.Errorf("systemctl stop %s: %w: %s", names[i], err, out)
			}
			return nil
		}))
	})
	for i := range names {
		_ = exec.Command("systemctl", "reset-failed", names[i]).Run()
		must.NoError(b, nspawn.RemoveRoot(roots[i]))
	}
	return took
}

// startStopAtOnce starts n tasks at once until all are READY, then stops and destroys them at
// once until all are gone, and returns what each took.
func startStopAtOnce(b *testing.B, d drivers.DriverPlugin, ready *readiness, toplevel, name string, n int) startStop {
	tasks := benchTasks(b, toplevel, name, n)
	var took startStop
	took.start = measure(b, func() { startAtOnce(b, d, ready, tasks, time.Minute) })
	took.stop = measure(b, func() { stopAtOnce(b, d, tasks) })
	return took
}

// benchTasks are n tasks of the closure, named name-0 to name-<n-1>.
func benchTasks(b *testing.B, toplevel, name string, n int) []*drivers.TaskConfig {
	tasks := make([]*drivers.TaskConfig, n)
	for i := range tasks {
		tasks[i] = benchTask(b, toplevel, fmt.Sprintf("%s-%d", name, i), storeViewClosure)
	}
	return tasks
}

// startAtOnce starts the tasks at once and returns how long until all were READY. A benchmark
// that fails before it destroyed them destroys them as it ends, so no machine outlives it.
func startAtOnce(b *testing.B, d drivers.DriverPlugin, ready *readiness, tasks []*drivers.TaskConfig, timeout time.Duration) time.Duration {
	b.Cleanup(func() {
		if b.Failed() {
			_ = atOnce(tasks, func(task *drivers.TaskConfig) error { return d.DestroyTask(task.ID, true) })
		}
	})
	t0 := time.Now()
	must.NoError(b, atOnce(tasks, func(task *drivers.TaskConfig) error {
		if _, _, err := d.StartTask(task); err != nil {
			return err
		}
		return ready.wait(task.ID, timeout)
	}))
	return time.Since(t0)
}

// stopAtOnce stops and destroys the tasks at once and returns how long until all were gone.
func stopAtOnce(b *testing.B, d drivers.DriverPlugin, tasks []*drivers.TaskConfig) time.Duration {
	t0 := time.Now()
	must.NoError(b, atOnce(tasks, func(task *drivers.TaskConfig) error {
		if err := d.StopTask(task.ID, 30*time.Second, ""); err != nil {
			return err
		}
		return d.DestroyTask(task.ID, true)
	}))
	return time.Since(t0)
}

// atOnce runs f for every task in a goroutine of its own and returns the first error.
func atOnce(tasks []*drivers.TaskConfig, f func(*drivers.TaskConfig) error) error {
	return eachAtOnce(len(tasks), func(i int) error {
		if err := f(tasks[i]); err != nil {
			return fmt.Errorf("task %s: %w", tasks[i].Name, err)
		}
		return nil
	})
}

// eachAtOnce runs f(0) to f(n-1), each in a goroutine of its own, and returns the first error.
func eachAtOnce(n int, f func(int) error) error {
	errs := make(chan error, n)
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := f(i); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	return <-errs
}

// readiness tells when tasks got ready, from the driver's task events.
type readiness struct {
	mu    sync.Mutex
	ready map[string]chan struct{}
}

func followReadiness(b *testing.B, d drivers.DriverPlugin) *readiness {
	ctx, cancel := context.WithCancel(context.Background())
	b.Cleanup(cancel)
	events, err := d.TaskEvents(ctx)
	must.NoError(b, err)
	r := &readiness{ready: map[string]chan struct{}{}}
	go func() {
		for ev := range events {
			if strings.Contains(ev.Message, "ready") {
				close(r.of(ev.TaskID))
			}
		}
	}()
	return r
}

func (r *readiness) of(taskID string) chan struct{} {
	r.mu.Lock()
	defer r.mu.Unlock()
	ch, ok := r.ready[taskID]
	if !ok {
		ch = make(chan struct{})
		r.ready[taskID] = ch
	}
	return ch
}

func (r *readiness) wait(taskID string, timeout time.Duration) error {
	select {
	case <-r.of(taskID):
		return nil
	case <-time.After(scaled(timeout)):
		return fmt.Errorf("not ready within %s", scaled(timeout))
	}
}

// An orderly stop of the systemd fixture (Debian's systemd as PID 1 powers off) through the
// driver, from StopTask until it returns with the exit recorded, against `systemctl stop` of the
// same machine started bare, taking turns in the same run.
func BenchmarkStop(b *testing.B) {
	toplevel := fixture(b, "NIXOS_NSPAWN_SYSTEMD_TOPLEVEL")
	d := benchNewDriver(b)
	defer d.Shutdown()
	ready := followReadiness(b, d)
	var driver, bare time.Duration
	for i := 0; i < b.N; i++ {
		task := benchTask(b, toplevel, fmt.Sprintf("stop%d", i), storeViewClosure)
		_, _, err := d.StartTask(task)
		must.NoError(b, err)
		must.NoError(b, ready.wait(task.ID, time.Minute))
		t0 := time.Now()
		must.NoError(b, d.StopTask(task.ID, 30*time.Second, ""))
		driver += time.Since(t0)
		status, err := d.InspectTask(task.ID)
		must.NoError(b, err)
		must.Eq(b, 0, status.ExitResult.ExitCode, must.Sprint("the guest did not power off in order: ", status.ExitResult))
		must.NoError(b, d.DestroyTask(task.ID, true))

		name := fmt.Sprintf("benchstop%d", i)
		root := filepath.Join(b.TempDir(), "root")
		must.NoError(b, nspawn.PrepareRoot(root))
		must.NoError(b, bareStart(name, root, toplevel, "--network-veth"))
		t0 = time.Now()
		out, err := exec.Command("systemctl", "stop", name).CombinedOutput()
		bare += time.Since(t0)
		must.NoError(b, err, must.Sprint(string(out)))
		_ = exec.Command("systemctl", "reset-failed", name).Run()
		must.NoError(b, nspawn.RemoveRoot(root))
	}
	n := time.Duration(b.N)
	reportMs(b, driver/n, "driver-ms")
	reportMs(b, bare/n, "bare-systemctl-stop-ms")
	b.ReportMetric(float64(driver)/float64(bare), "driver/bare")
	b.ReportMetric(0, "ns/op")
}

// scaleMachines is how many machines BenchmarkScale runs at once.
const scaleMachines = 100

// statsWindow is how long BenchmarkScale measures the plugin's CPU time, with and without stats:
// one period of the handles' slow poll, so each window holds one round of their status reads,
// which fall within a few seconds of each other for machines started at once.
const statsWindow = pollInterval

// A hundred machines of the tiny fixture, started at once through the real plugin binary: the
// time until all are READY (against one machine alone), the plugin's RSS, the memory each machine
// costs outside its guest (nspawn, the console forwarder, the plugin's growth), the plugin's CPU
// while it follows them, and with Nomad's stats stream at its 1 s interval for every task. Then
// all are stopped at once, and nothing may be left.
func BenchmarkScale(b *testing.B) {
	binary := fixture(b, "NIXOS_NSPAWN_PLUGIN")
	toplevel := fixture(b, "NIXOS_NSPAWN_TINY_TOPLEVEL")
	for i := 0; i < b.N; i++ {
		p := servePlugin(b, binary)
		ready := followReadiness(b, p)
		before := inventory(b, p.dataDir)
		rss0 := vmRSS(b, p.pid)
		one := startStopAtOnce(b, p, ready, toplevel, fmt.Sprintf("alone%d", i), 1).start.wall

		tasks := benchTasks(b, toplevel, fmt.Sprintf("scale%d", i), scaleMachines)
		all := startAtOnce(b, p, ready, tasks, 5*time.Minute)
		// Let the watchers settle into their steady state.
		time.Sleep(3 * time.Second)
		rss := vmRSS(b, p.pid)
		var nspawnPSS, forwarderPSS float64
		for _, task := range tasks {
			machine := machineOfTaskID(b, task.ID)
			nspawnPSS += unitMemory(b, nspawn.UnitName(machine)).pss / scaleMachines
			forwarderPSS += forwarderMemory(b, machine).pss / scaleMachines
		}
		idle := cpuShare(b, p.pid, statsWindow)
		ctx, cancel := context.WithCancel(context.Background())
		for _, task := range tasks {
			ch, err := p.TaskStats(ctx, task.ID, time.Second)
			must.NoError(b, err)
			go func() {
				for range ch {
				}
			}()
		}
		withStats := cpuShare(b, p.pid, statsWindow)
		cancel()

		stopped := stopAtOnce(b, p, tasks)
		p.kill()
		must.SliceEmpty(b, leftovers(b, p.dataDir, before))

		b.ReportMetric(all.Seconds(), fmt.Sprintf("all-%d-ready-s", scaleMachines))
		reportMs(b, one, "one-ready-ms")
		b.ReportMetric(float64(all)/float64(one)/scaleMachines, "per-machine/one")
		b.ReportMetric(stopped.Seconds(), fmt.Sprintf("all-%d-gone-s", scaleMachines))
		b.ReportMetric(rss0, "plugin-RSS-MiB/idle")
		b.ReportMetric(rss, fmt.Sprintf("plugin-RSS-MiB/%d-machines", scaleMachines))
		growth := (rss - rss0) / scaleMachines
		b.ReportMetric(nspawnPSS, "nspawn-PSS-MiB/machine")
		b.ReportMetric(forwarderPSS, "forwarder-PSS-MiB/machine")
		b.ReportMetric(growth, "plugin-growth-MiB/machine")
		b.ReportMetric(nspawnPSS+forwarderPSS+growth, "outside-guest-MiB/machine")
		b.ReportMetric(idle.total*100, "plugin-CPU-%core/following")
		b.ReportMetric((withStats.total-idle.total)*100, "plugin-CPU-%core/stats-1s")
		b.ReportMetric((withStats.system-idle.system)*100, "plugin-CPU-%core/stats-1s-in-kernel")
	}
	b.ReportMetric(0, "ns/op")
}

// cpuUse is the share of one core a process used, and the part of it in the kernel.
type cpuUse struct{ total, system float64 }

// cpuShare is the share of one core the process used over window: the total from its threads'
// run times in nanoseconds, the kernel's part in clock ticks (USER_HZ, 100 on Linux), which are
// too coarse for the total of a window in which it used a few ticks.
func cpuShare(b *testing.B, pid int, window time.Duration) cpuUse {
	t0 := time.Now()
	run0 := runTime(b, pid)
	_, s0 := cpuTicks(b, pid)
	time.Sleep(window)
	run1 := runTime(b, pid)
	_, s1 := cpuTicks(b, pid)
	secs := time.Since(t0).Seconds()
	return cpuUse{total: (run1 - run0).Seconds() / secs, system: float64(s1-s0) / 100 / secs}
}

// runTime is how long the process's threads ran, the first field of each one's schedstat. A
// thread that ends meanwhile takes its time along; Go's runtime keeps its threads.
func runTime(b *testing.B, pid int) time.Duration {
	files, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/schedstat", pid))
	must.NoError(b, err)
	must.SliceNotEmpty(b, files)
	var sum time.Duration
	for _, f := range files {
		raw, err := os.ReadFile(f)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		must.NoError(b, err)
		ns, err := strconv.ParseInt(strings.Fields(string(raw))[0], 10, 64)
		must.NoError(b, err)
		sum += time.Duration(ns)
	}
	return sum
}

// cpuTicks is the user and system time of a process, in clock ticks.
func cpuTicks(b *testing.B, pid int) (user, system int) {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	must.NoError(b, err)
	// Fields after the command name, which is in parentheses and may hold spaces.
	f := strings.Fields(string(raw[strings.LastIndexByte(string(raw), ')')+1:]))
	utime, err := strconv.Atoi(f[11])
	must.NoError(b, err)
	stime, err := strconv.Atoi(f[12])
	must.NoError(b, err)
	return utime, stime
}

func reportMs(b *testing.B, d time.Duration, unit string) {
	b.ReportMetric(float64(d.Microseconds())/1000, unit)
}
