// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package driver

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/nomad/plugins/drivers"

	"github.com/nomad-nixos/nomad-driver-nixos/nspawn"
)

// pollInterval is how often a handle reads its unit's state. Exit latency, not correctness, depends
// on it: the unit keeps its exit status until the task is destroyed.
const pollInterval = 100 * time.Millisecond

// taskHandle follows one machine: its unit state, readiness, OOM kills, console and exit.
type taskHandle struct {
	logger  hclog.Logger
	mgr     *nspawn.Manager
	cgroups nspawn.Cgroups
	console *nspawn.Console
	emit    func(msg string, annotations map[string]string)

	taskConfig   *drivers.TaskConfig
	state        TaskState
	readyTimeout time.Duration

	mu          sync.RWMutex
	ready       bool
	cgroupPath  string
	oomKills    uint64
	completedAt time.Time
	exitResult  *drivers.ExitResult

	doneCh chan struct{}
	cancel context.CancelFunc
	// followDone is closed when the console follower stopped.
	followDone chan struct{}
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
			"machine": h.state.Machine,
			"unit":    h.state.Unit,
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
	followCtx, stopFollow := context.WithCancel(ctx)
	go h.follow(followCtx)
	defer stopFollow()

	failures := 0
	ticker := time.NewTicker(pollInterval)
	defer ticker.Stop()
	for {
		st, err := h.mgr.Status(ctx, h.state.Unit)
		switch {
		case ctx.Err() != nil:
			return
		case err != nil:
			// The bus or systemd may be restarting; the machine runs on without us.
			failures++
			if failures%50 == 1 {
				h.logger.Warn("cannot read machine unit state", "unit", h.state.Unit, "error", err)
			}
		case !st.Loaded():
			h.finish(ctx, stopFollow, nil, fmt.Errorf("unit %s disappeared: the machine was removed outside Nomad, its exit status is unknown", h.state.Unit))
			return
		case st.InvocationID != h.state.InvocationID && st.InvocationID != "" && h.state.Config.RebootPolicy != string(nspawn.RebootRestart):
			h.finish(ctx, stopFollow, nil, fmt.Errorf("unit %s was replaced by another invocation (%s), the machine's exit status is unknown", h.state.Unit, st.InvocationID))
			return
		default:
			failures = 0
			h.observe(st)
			if !st.Running() {
				h.finish(ctx, stopFollow, &st, nil)
				return
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}
	}
}

// observe notes readiness and OOM kills of a live machine, and reports them as task events.
func (h *taskHandle) observe(st nspawn.UnitStatus) {
	h.mu.Lock()
	if st.ControlGroup != "" {
		h.cgroupPath = st.ControlGroup
	}
	cg := h.cgroupPath
	becameReady := st.Ready() && !h.ready
	if becameReady {
		h.ready = true
	}
	h.mu.Unlock()
	if becameReady {
		h.emit("Machine is ready: the guest reported READY=1", map[string]string{"machine": h.state.Machine})
	}
	if cg == "" {
		return
	}
	kills, err := h.cgroups.OOMKills(cg)
	if err != nil {
		return
	}
	h.mu.Lock()
	newKills := kills > h.oomKills
	h.oomKills = kills
	h.mu.Unlock()
	if newKills {
		h.emit("The OOM killer killed a process in the machine", map[string]string{"oom_kills": fmt.Sprint(kills)})
	}
}

// follow forwards the console to Nomad's log until ctx ends, restarting after errors.
func (h *taskHandle) follow(ctx context.Context) {
	defer close(h.followDone)
	for ctx.Err() == nil {
		if err := h.console.Follow(ctx); err != nil && ctx.Err() == nil {
			h.logger.Warn("forwarding the machine console failed, retrying", "unit", h.state.Unit, "error", err)
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
		}
	}
}

// finish drains the console so the machine's last lines reach the log before its exit is
// reported, then publishes the exit.
func (h *taskHandle) finish(ctx context.Context, stopFollow context.CancelFunc, st *nspawn.UnitStatus, failure error) {
	stopFollow()
	<-h.followDone
	if err := h.console.Drain(ctx); err != nil && ctx.Err() == nil {
		h.logger.Warn("draining the machine console failed", "unit", h.state.Unit, "error", err)
	}
	if ctx.Err() != nil {
		return
	}
	tail := h.console.Tail()
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

func (h *taskHandle) result() *drivers.ExitResult {
	h.mu.RLock()
	defer h.mu.RUnlock()
	return h.exitResult.Copy()
}
