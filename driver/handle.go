// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package driver

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/nomad/plugins/drivers"

	"github.com/nomad-nixos/nomad-driver-nixos/cgroupfs"
	"github.com/nomad-nixos/nomad-driver-nixos/console"
	"github.com/nomad-nixos/nomad-driver-nixos/hostnet"
	"github.com/nomad-nixos/nomad-driver-nixos/nspawn"
)

// A handle reads its unit's state when systemd signals a change, and every pollInterval in case
// a signal was missed (a reconnect to the bus wakes it too). Exit latency, not correctness,
// depends on it: the unit keeps its exit status, or records it when it is unloaded, until the
// task is destroyed. Each read is a dozen property reads from systemd (nspawn.Manager.Status).
const pollInterval = 30 * time.Second

const (
	// consoleTailLines is how much of the console an error about a failed machine quotes.
	consoleTailLines = 20
	// consoleStallWait is how long an ended machine's forwarder may deliver nothing before the
	// exit is reported without waiting for the rest: Nomad's reader may be gone.
	consoleStallWait = 30 * time.Second
	// dropsInterval is how often a handle looks for console output the forwarder dropped.
	dropsInterval = 5 * time.Second
	// consoleProgressInterval is how often an ended machine's handle looks whether its forwarder
	// still delivers.
	consoleProgressInterval = time.Second
)

// taskHandle follows one machine: its unit state, readiness, OOM kills, console and exit.
type taskHandle struct {
	logger  hclog.Logger
	m       *machine
	cgroups cgroupfs.Cgroups
	emit    func(msg string, annotations map[string]string)

	taskConfig   *drivers.TaskConfig
	state        TaskState
	readyTimeout time.Duration

	// linkInvocation is the invocation of the unit whose link is addressed.
	linkInvocation string

	mu          sync.RWMutex
	ready       bool
	cgroupPath  string
	oomKills    uint64
	completedAt time.Time
	exitResult  *drivers.ExitResult

	// dropsMu serialises reporting dropped console output.
	dropsMu sync.Mutex

	// forwarder forwards the console to Nomad. fwMu serialises its start with the task's
	// destruction, so a destroyed task leaves no forwarder behind.
	forwarder   nspawn.Forwarder
	fwMu        sync.Mutex
	fwStarted   bool
	fwDestroyed bool

	doneCh chan struct{}
	cancel context.CancelFunc
}

func (h *taskHandle) running() bool {
	select {
	case <-h.doneCh:
		return false
	default:
		return true
	}
}

func (h *taskHandle) status() *drivers.TaskStatus {
	h.mu.RLock()
	defer h.mu.RUnlock()
	st := &drivers.TaskStatus{
		ID:          h.taskConfig.ID,
		Name:        h.taskConfig.Name,
		State:       drivers.TaskStateRunning,
		StartedAt:   h.state.StartedAt,
		CompletedAt: h.completedAt,
		ExitResult:  h.exitResult.Copy(),
		DriverAttributes: map[string]string{
			"machine": h.m.name,
			"unit":    h.m.unit(),
		},
	}
	if h.exitResult != nil {
		st.State = drivers.TaskStateExited
	}
	return st
}

// run follows the machine until it ends, then records the exit. It returns at once when ctx ends
// (the plugin shuts down or the task is destroyed), leaving the machine alone.
func (h *taskHandle) run(ctx context.Context) {
	go h.watchDrops(ctx)
	changed, unwatch := h.m.mgr.WatchUnit(h.m.unit())
	defer unwatch()
	forwarderDue := time.After(forwarderDelay)
	failures := 0
	for {
		st, err := h.m.mgr.Status(ctx, h.m.unit())
		switch {
		case ctx.Err() != nil:
			return
		case err != nil:
			// The bus or systemd may be restarting; the machine runs on without us.
			failures++
			if failures%50 == 1 {
				h.logger.Warn("cannot read machine unit state", "unit", h.m.unit(), "error", err)
			}
		case !st.Loaded():
			// A successful end unloads the unit; it recorded its exit first.
			recorded, ok, err := h.m.recordedExit()
			if err == nil && !ok {
				err = fmt.Errorf("unit %s disappeared without recording an exit: the machine was removed outside Nomad", h.m.unit())
			}
			if err != nil {
				h.finish(ctx, nil, err)
			} else {
				h.finish(ctx, &recorded, nil)
			}
			return
		case st.InvocationID != h.state.InvocationID && st.InvocationID != "" && h.state.Config.RebootPolicy != string(nspawn.RebootRestart):
			h.finish(ctx, nil, fmt.Errorf("unit %s was replaced by another invocation (%s), the machine's exit status is unknown", h.m.unit(), st.InvocationID))
			return
		default:
			failures = 0
			h.observe(ctx, st)
			if st.Ready() {
				h.startForwarder()
			}
			h.readdress(st)
			if !st.Running() {
				h.finish(ctx, &st, nil)
				return
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-changed:
		case <-forwarderDue:
			h.startForwarder()
		case <-time.After(pollInterval):
		}
	}
}

// forwarderDelay is how long the console forwarder waits for the machine to get ready or end
// before it starts anyway. Started beside the machine, the forwarder's sandbox cost a tiny
// machine a fifth of its start on a 2-core host (about 30 ms); the console log keeps every
// byte meanwhile, and the forwarder delivers from its start.
const forwarderDelay = time.Second

// startForwarder starts the console forwarder, unless it was started or the task is being
// destroyed; one of an earlier plugin run is kept. A failed start is tried again at the next
// change of the machine.
func (h *taskHandle) startForwarder() {
	h.fwMu.Lock()
	defer h.fwMu.Unlock()
	if h.fwStarted || h.fwDestroyed {
		return
	}
	// Not the handle's context: a start cut off by the task's destruction could still make
	// the unit after the destruction removed it.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	err := h.m.mgr.StartUnit(ctx, h.m.consoleUnit(), h.forwarder.UnitProperties(h.m.unit()))
	if err != nil && !nspawn.IsUnitExists(err) {
		h.logger.Error("cannot start the console forwarder", "error", err)
		h.emit(fmt.Sprintf("The console forwarder did not start, so Nomad gets no console output for now (kept in %s): %v", h.m.console().Log(), err), nil)
		return
	}
	h.fwStarted = true
}

// endForwarding keeps a forwarder from starting once the task is being destroyed.
func (h *taskHandle) endForwarding() {
	h.fwMu.Lock()
	defer h.fwMu.Unlock()
	h.fwDestroyed = true
}

// readdress gives the link of a machine that rebooted in place its addresses again: nspawn made
// a new pair for the new invocation.
func (h *taskHandle) readdress(st nspawn.UnitStatus) {
	if h.state.Link == nil || !st.Running() || st.InvocationID == "" || st.InvocationID == h.linkInvocation {
		return
	}
	if ok, _ := h.m.mgr.Registered(h.m.name); !ok {
		return
	}
	veth := hostnet.NewVeth(h.m.name, h.state.Link.addressing())
	leader, err := h.m.mgr.Leader(h.m.name)
	if err == nil {
		err = veth.ConfigureHost()
	}
	if err == nil {
		err = veth.ConfigureGuest(leader)
	}
	if err != nil {
		h.logger.Warn("cannot address the machine's link after its reboot", "error", err)
		return
	}
	h.linkInvocation = st.InvocationID
	h.emit("machine rebooted in place: its link is addressed again", nil)
}

// observe notes readiness of a live machine and reports it as a task event. The first time the
// unit's cgroup is known, it starts following OOM kills there.
func (h *taskHandle) observe(ctx context.Context, st nspawn.UnitStatus) {
	h.mu.Lock()
	firstCgroup := h.cgroupPath == "" && st.ControlGroup != ""
	if st.ControlGroup != "" {
		h.cgroupPath = st.ControlGroup
	}
	becameReady := st.Ready() && !h.ready
	if becameReady {
		h.ready = true
	}
	h.mu.Unlock()
	if becameReady {
		h.emit("Machine is ready: the guest reported READY=1", map[string]string{"machine": h.m.name})
	}
	if firstCgroup {
		go h.watchOOM(ctx, st.ControlGroup)
		go h.followSharedCPUs(ctx)
	}
}

// sharedCPUsPeriod is how often a machine without reserved cores catches up with the cores
// Nomad shares between tasks.
const sharedCPUsPeriod = 3 * time.Second

// followSharedCPUs keeps a machine without reserved cores off the cores other tasks reserved.
// Nomad keeps its share partition's cpuset up to date (cpuset.cpus.effective of the task's cgroup
// below nomad.slice/share.slice); the machine runs under the driver's slice instead, so its
// AllowedCPUs follow that cpuset. systemd applies AllowedCPUs on cgroup v2 only.
func (h *taskHandle) followSharedCPUs(ctx context.Context) {
	lr := h.taskConfig.Resources.LinuxResources
	if h.cgroups.Mode != cgroupfs.CgroupUnified || lr == nil || lr.CpusetCgroupPath == "" || reservedCPUs(lr) != "" {
		return
	}
	source := filepath.Join(lr.CpusetCgroupPath, "cpuset.cpus.effective")
	var applied string
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-h.doneCh:
			return
		case <-t.C:
			t.Reset(sharedCPUsPeriod)
		}
		b, err := os.ReadFile(source)
		cpus := strings.TrimSpace(string(b))
		if err != nil || cpus == "" || cpus == applied {
			continue
		}
		if err := h.m.mgr.SetAllowedCPUs(ctx, nspawn.UnitName(h.m.name), cpus); err != nil {
			h.logger.Warn("cannot follow the cores Nomad shares", "cpus", cpus, "error", err)
			continue
		}
		applied = cpus
	}
}

// watchOOM counts the OOM kills in the machine and reports each as a task event. Kills from
// before it started (while a restarted plugin was down) are counted, not reported again.
func (h *taskHandle) watchOOM(ctx context.Context, cgroup string) {
	if before, err := h.cgroups.OOMKills(cgroup); err == nil {
		h.mu.Lock()
		h.oomKills = before
		h.mu.Unlock()
	}
	err := h.cgroups.WatchOOM(ctx, cgroup, func() {
		h.mu.Lock()
		h.oomKills++
		kills := h.oomKills
		h.mu.Unlock()
		h.emit("The OOM killer killed a process in the machine", map[string]string{"oom_kills": fmt.Sprint(kills)})
	})
	if err != nil && !cgroupfs.IsGone(err) {
		h.logger.Warn("cannot follow OOM kills of the machine", "cgroup", cgroup, "error", err)
	}
}

// finish tells the console forwarder that the machine ended and waits for it to deliver the last
// lines, so they are in the log before the exit is reported, then publishes the exit.
func (h *taskHandle) finish(ctx context.Context, st *nspawn.UnitStatus, failure error) {
	h.startForwarder()
	if err := console.MarkEnd(h.m.dir); err != nil {
		h.logger.Warn("cannot tell the console forwarder that the machine ended", "error", err)
	}
	h.awaitConsole(ctx)
	if ctx.Err() != nil {
		return
	}
	h.reportDrops()
	tail := console.Tail(h.m.dir, consoleTailLines)
	res := &drivers.ExitResult{ExitCode: -1}
	if st != nil {
		// Only the console tells a guest PID 1 killed by a signal apart from exit status 1.
		exit, err := nspawn.ExitOf(*st, tail)
		switch {
		case err != nil:
			failure = err
		case exit.NotReady:
			failure = fmt.Errorf("machine did not get ready within ready_timeout (%s); last console lines:\n%s", h.readyTimeout, strings.Join(tail, "\n"))
		default:
			res.ExitCode, res.Signal = exit.Code, exit.Signal
			h.mu.RLock()
			res.OOMKilled = exit.OOMKilled || (h.oomKills > 0 && exit.Code != 0)
			h.mu.RUnlock()
		}
	}
	if failure != nil {
		res.Err = failure
	}
	h.mu.Lock()
	h.exitResult = res
	h.completedAt = time.Now()
	h.mu.Unlock()
	close(h.doneCh)
}

// awaitConsole waits until the forwarder unit ended; it ends by itself once it delivered the
// console of an ended machine. It may take long for a lot of output, so it gives up only when
// the forwarder stops making progress.
func (h *taskHandle) awaitConsole(ctx context.Context) {
	unit := h.m.consoleUnit()
	ended, unwatch := h.m.mgr.WatchUnit(unit)
	defer unwatch()
	offsetFile := h.m.console().Offset()
	var offset []byte
	progressed := time.Now()
	for time.Since(progressed) < consoleStallWait {
		st, err := h.m.mgr.Status(ctx, unit)
		if ctx.Err() != nil || (err == nil && !st.Running()) {
			return
		}
		if now, _ := os.ReadFile(offsetFile); !bytes.Equal(now, offset) {
			offset, progressed = now, time.Now()
		}
		select {
		case <-ctx.Done():
			return
		case <-ended:
		case <-time.After(consoleProgressInterval):
		}
	}
	h.logger.Warn("the console forwarder delivers nothing, the log may miss the last lines", "unit", unit, "stalled", consoleStallWait)
}

// watchDrops reports console output the forwarder dropped as task events until ctx ends.
func (h *taskHandle) watchDrops(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(dropsInterval):
			h.reportDrops()
		}
	}
}

// reportDrops turns the forwarder's new drop records into task events. What was reported is
// kept in a file, so a restarted plugin does not report it again.
func (h *taskHandle) reportDrops() {
	h.dropsMu.Lock()
	defer h.dropsMu.Unlock()
	files := h.m.console()
	b, err := os.ReadFile(files.Dropped())
	if err != nil {
		return
	}
	seen := 0
	if s, err := os.ReadFile(files.DroppedSeen()); err == nil {
		seen, _ = strconv.Atoi(strings.TrimSpace(string(s)))
	}
	if seen > len(b) {
		seen = 0
	}
	// Only whole records: a half-written one is reported once complete.
	end := seen + bytes.LastIndexByte(b[seen:], '\n') + 1
	if end == seen {
		return
	}
	for _, line := range strings.Split(string(b[seen:end-1]), "\n") {
		when, n, ok := strings.Cut(line, " ")
		if !ok {
			continue
		}
		h.emit(fmt.Sprintf("Dropped %s bytes of console output at %s: Nomad's log reader fell more than console_backlog behind", n, when),
			map[string]string{"dropped_bytes": n, "dropped_at": when})
	}
	if err := os.WriteFile(files.DroppedSeen(), []byte(strconv.Itoa(end)), 0o600); err != nil {
		h.logger.Warn("cannot record reported console drops", "error", err)
	}
}

func (h *taskHandle) result() *drivers.ExitResult {
	h.mu.RLock()
	defer h.mu.RUnlock()
	return h.exitResult.Copy()
}
