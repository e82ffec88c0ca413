// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

// Package driver is the Nomad side of nomad-driver-nixos: config, fingerprint, task lifecycle,
// recovery, stats and events. The machines themselves are run by package nspawn.
package driver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/consul-template/signals"
	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/nomad/client/lib/cpustats"
	"github.com/hashicorp/nomad/drivers/shared/eventer"
	"github.com/hashicorp/nomad/plugins/base"
	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/hashicorp/nomad/plugins/drivers/fsisolation"
	"github.com/hashicorp/nomad/plugins/shared/hclspec"

	"github.com/nomad-nixos/nomad-driver-nixos/cgroupfs"
	"github.com/nomad-nixos/nomad-driver-nixos/closure"
	"github.com/nomad-nixos/nomad-driver-nixos/hostnet"
	"github.com/nomad-nixos/nomad-driver-nixos/nspawn"
)

const (
	// PluginName is what jobs put in `driver`.
	PluginName = "nixos-nspawn"
	// PluginVersion is reported to Nomad and as a node attribute.
	PluginVersion = "0.1.0"

	fingerprintPeriod = 30 * time.Second
	// registerTimeout bounds how long StartTask waits for nspawn to register the machine.
	registerTimeout = 30 * time.Second
	// launchPollInterval is how often StartTask looks for the registration without a signal
	// from systemd or machined.
	launchPollInterval = 250 * time.Millisecond
	// stopTimeout is systemd's bound on stopping a unit whose start timed out.
	stopTimeout = 30 * time.Second
	// stopResendInterval is how often StopTask repeats the shutdown signal to a booting guest.
	stopResendInterval = 500 * time.Millisecond
	// envFileName is the task environment, in EnvironmentFile= format, in the secrets directory.
	envFileName = "nomad.env"
)

var pluginInfo = &base.PluginInfoResponse{
	Type:              base.PluginTypeDriver,
	PluginApiVersions: []string{drivers.ApiVersion010},
	PluginVersion:     PluginVersion,
	Name:              PluginName,
}

var capabilities = &drivers.Capabilities{
	SendSignals: true,
	Exec:        true,
	// The machine gets Nomad's alloc, local and secrets directories bound in, like docker does.
	FSIsolation: fsisolation.Image,
	// group: the machine runs in the task group's namespace (bridge mode), which Nomad makes.
	NetIsolationModes: []drivers.NetIsolationMode{drivers.NetIsolationModeHost, drivers.NetIsolationModeGroup},
	// Host and CSI volumes become idmapped binds. (Nomad's client does not ask an external
	// plugin for this over gRPC, and takes "all" either way.)
	MountConfigs: drivers.MountConfigSupportAll,
}

var (
	_ drivers.DriverPlugin            = (*Driver)(nil)
	_ drivers.ExecTaskStreamingDriver = (*Driver)(nil)
)

// Driver runs Nomad tasks as systemd-nspawn machines booting NixOS system closures.
type Driver struct {
	eventer *eventer.Eventer
	ctx     context.Context
	cancel  context.CancelFunc
	logger  hclog.Logger
	tasks   *taskStore
	mgr     *nspawn.Manager
	// self is this binary, which also starts exec sessions inside machines.
	self string

	mu     sync.RWMutex
	config PluginConfig
	// consoleHelper is the installed console helper binary, which forwards each machine's console.
	consoleHelper string
	compute       cpustats.Compute
	cgroups       cgroupfs.Cgroups
	imp           *closure.Importer
	// stopGC ends the garbage collector of imp.
	stopGC context.CancelFunc

	stats statsRounds

	// addrMu serialises address allocation.
	addrMu sync.Mutex
	// reconciled makes the first enabled config clean up after machines that are gone.
	reconciled sync.Once
}

// NewDriver returns a driver that is configured later through SetConfig.
func NewDriver(logger hclog.Logger) *Driver {
	ctx, cancel := context.WithCancel(context.Background())
	logger = logger.Named(PluginName)
	self, err := os.Executable()
	if err != nil {
		logger.Error("cannot find the plugin binary, exec with a TTY will not work", "error", err)
	}
	return &Driver{
		self:    self,
		eventer: eventer.NewEventer(ctx, logger),
		ctx:     ctx,
		cancel:  cancel,
		logger:  logger,
		tasks:   newTaskStore(),
		mgr:     nspawn.NewManager(),
	}
}

func (d *Driver) PluginInfo() (*base.PluginInfoResponse, error) { return pluginInfo, nil }

func (d *Driver) ConfigSchema() (*hclspec.Spec, error) { return pluginConfigSpec, nil }

func (d *Driver) SetConfig(cfg *base.Config) error {
	var c PluginConfig
	if len(cfg.PluginConfig) != 0 {
		if err := base.MsgPackDecode(cfg.PluginConfig, &c); err != nil {
			return err
		}
	}
	if err := c.validate(); err != nil {
		return fmt.Errorf("nixos-nspawn plugin config: %w", err)
	}
	cg, err := cgroupfs.DetectCgroups("/sys/fs/cgroup")
	if err != nil {
		d.logger.Warn("cannot tell the cgroup mode", "error", err)
	}
	var imp *closure.Importer
	var helper string
	if c.Enabled {
		if err := prepareDataDir(c.DataDir); err != nil {
			return fmt.Errorf("nixos-nspawn plugin config: %w", err)
		}
		if helper, err = installConsoleHelper(c.DataDir); err != nil {
			return fmt.Errorf("nixos-nspawn plugin config: %w", err)
		}
		if imp, err = newImporter(c); err != nil {
			return fmt.Errorf("nixos-nspawn plugin config: %w", err)
		}
	}
	d.mu.Lock()
	// One collector, of the importer in use: a new config replaces the last one's.
	if d.stopGC != nil {
		d.stopGC()
		d.stopGC = nil
	}
	if imp != nil {
		ctx, cancel := context.WithCancel(d.ctx)
		d.stopGC = cancel
		go d.collectGarbage(ctx, imp, c.gcGrace)
	}
	d.config = c
	d.consoleHelper = helper
	d.cgroups = cg
	d.imp = imp
	if cfg.AgentConfig != nil {
		d.compute = cfg.AgentConfig.Compute()
	}
	d.mu.Unlock()
	if c.Enabled {
		// Before any task starts, so no link of a machine being started is taken for a leftover.
		d.reconciled.Do(func() { d.reconcileNetwork(d.ctx) })
	}
	return nil
}

func (d *Driver) pluginConfig() PluginConfig {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.config
}

func (d *Driver) TaskConfigSchema() (*hclspec.Spec, error) { return taskConfigSpec, nil }

func (d *Driver) Capabilities() (*drivers.Capabilities, error) { return capabilities, nil }

func (d *Driver) TaskEvents(ctx context.Context) (<-chan *drivers.TaskEvent, error) {
	return d.eventer.TaskEvents(ctx)
}

// Shutdown stops following machines; the machines keep running.
func (d *Driver) Shutdown() {
	d.cancel()
	d.mgr.Close()
}

func (d *Driver) emitter(cfg *drivers.TaskConfig) func(string, map[string]string) {
	return func(msg string, annotations map[string]string) {
		_ = d.eventer.EmitEvent(&drivers.TaskEvent{
			TaskID:      cfg.ID,
			TaskName:    cfg.Name,
			AllocID:     cfg.AllocID,
			Timestamp:   time.Now(),
			Message:     msg,
			Annotations: annotations,
		})
	}
}

func (d *Driver) StartTask(cfg *drivers.TaskConfig) (*drivers.TaskHandle, *drivers.DriverNetwork, error) {
	if _, ok := d.tasks.get(cfg.ID); ok {
		return nil, nil, fmt.Errorf("task %s is already running", cfg.ID)
	}
	pc := d.pluginConfig()
	if !pc.Enabled {
		return nil, nil, errors.New("the nixos-nspawn driver is disabled in the plugin config (enabled = false)")
	}
	var tc TaskConfig
	if err := cfg.DecodeDriverConfig(&tc); err != nil {
		return nil, nil, fmt.Errorf("decoding task config: %w", err)
	}
	opts, err := tc.validate()
	if err != nil {
		return nil, nil, err
	}
	if iso := cfg.NetworkIsolation; iso != nil && iso.Mode == drivers.NetIsolationModeGroup {
		if err := tc.groupNetwork(iso); err != nil {
			return nil, nil, err
		}
		if err := d.bridgeUsable(); err != nil {
			return nil, nil, err
		}
		opts.networkMode = nspawn.NetworkGroup
	}
	if opts.privileges, err = tc.privileges(pc, opts.networkMode); err != nil {
		return nil, nil, err
	}
	m, err := d.machine(cfg.AllocID, cfg.Name)
	if err != nil {
		return nil, nil, err
	}
	// A machine of the same name is a leftover of an earlier run of this very task.
	if err := m.remove(d.ctx); err != nil {
		return nil, nil, fmt.Errorf("removing the leftovers of an earlier run: %w", err)
	}
	// Fetching a closure takes as long as it takes; only the start below is bounded.
	view, err := d.fetchClosure(d.ctx, m, cfg, &tc, opts)
	var handle *drivers.TaskHandle
	var network *drivers.DriverNetwork
	if err == nil {
		handle, network, err = d.start(m, cfg, tc, opts, view, pc)
	}
	if err != nil {
		if cerr := m.remove(context.Background()); cerr != nil {
			m.logger.Error("rolling back a failed start", "error", cerr)
		}
		return nil, nil, err
	}
	return handle, network, nil
}

// start launches the machine of a task whose closure is in place and starts following it. In
// veth mode it returns the machine's network: the driver chose its address, so it is known now.
func (d *Driver) start(m *machine, cfg *drivers.TaskConfig, tc TaskConfig, opts taskOptions, view nspawn.StoreView, pc PluginConfig) (*drivers.TaskHandle, *drivers.DriverNetwork, error) {
	spec, err := d.machineSpec(m, cfg, &tc, opts, view)
	if err != nil {
		return nil, nil, err
	}
	if left := leftOutEnv(cfg.Env); len(left) > 0 {
		msg := "Environment variables not given to the machine: " + strings.Join(left, ", ")
		d.logger.Warn(msg, "task_id", cfg.ID)
		d.emitter(cfg)(msg, nil)
	}
	var link *machineLink
	var network *drivers.DriverNetwork
	if ns := spec.Network.NamespacePath; ns != "" {
		msg := "machine runs in the task group's network namespace " + ns
		// Not fatal: a guest that binds no low port runs well without it. It fails where
		// /proc/sys is read-only, as in a host that is itself a container.
		before, err := hostnet.LowerUnprivilegedPortStart(ns, 0)
		switch {
		case err != nil:
			msg += fmt.Sprintf("; guest services there cannot bind ports below %d: %v", before, err)
			d.logger.Warn("cannot lower ip_unprivileged_port_start in the group's namespace", "task_id", cfg.ID, "error", err)
		case before > 0:
			msg += fmt.Sprintf("; ports below %d opened to every process there (net.ipv4.ip_unprivileged_port_start = 0), as the guest holds no capabilities over it", before)
		}
		d.emitter(cfg)(msg, nil)
	}
	if spec.Network.VethHost != "" {
		addr, err := d.allocateAddress(m, pc.pools)
		if err != nil {
			return nil, nil, err
		}
		fwds, portMap, err := forwards(cfg, tc.Ports, addr)
		if err != nil {
			return nil, nil, err
		}
		link = &machineLink{veth: hostnet.NewVeth(m.name, addr), forwards: fwds, pools: pc.pools.list()}
		network = driverNetwork(addr, portMap)
	}
	ctx, cancel := context.WithTimeout(d.ctx, registerTimeout+time.Minute)
	defer cancel()
	st, err := m.launch(ctx, cfg, spec, opts.credentials, link)
	if err != nil {
		return nil, nil, err
	}

	state := TaskState{
		Config:       tc,
		Machine:      m.name,
		Unit:         m.unit(),
		InvocationID: st.InvocationID,
		MachineDir:   m.dir,
		StartedAt:    time.Now(),
	}
	if link != nil {
		state.Link = linkState(link.veth.Addr)
	}
	handle := drivers.NewTaskHandle(taskHandleVersion)
	handle.Config = cfg
	if err := handle.SetDriverState(&state); err != nil {
		return nil, nil, fmt.Errorf("saving task state: %w", err)
	}
	if err := d.track(m, cfg, state, opts.readyTimeout, false); err != nil {
		return nil, nil, err
	}
	if link != nil {
		d.emitter(cfg)(link.describe(), nil)
	}
	return handle, network, nil
}

// track creates the handle of a started or recovered machine and starts following it.
// reported says whether readiness was already reported (by the plugin before a restart).
func (d *Driver) track(m *machine, cfg *drivers.TaskConfig, state TaskState, readyTimeout time.Duration, reported bool) error {
	pc := d.pluginConfig()
	d.mu.RLock()
	cgroups := d.cgroups
	fw := nspawn.Forwarder{
		Helper:     d.consoleHelper,
		MachineDir: m.dir,
		FIFO:       orDevNull(cfg.StdoutPath),
		StderrFIFO: orDevNull(cfg.StderrPath),
		Backlog:    pc.consoleBacklog,
	}
	d.mu.RUnlock()
	ctx, cancel := context.WithCancel(d.ctx)
	h := &taskHandle{
		// The link of the invocation that started (or was recovered) is addressed already.
		linkInvocation: state.InvocationID,
		logger:         m.logger.With("task_id", cfg.ID),
		m:              m,
		cgroups:        cgroups,
		emit:           d.emitter(cfg),
		taskConfig:     cfg,
		state:          state,
		readyTimeout:   readyTimeout,
		ready:          reported,
		forwarder:      fw,
		doneCh:         make(chan struct{}),
		cancel:         cancel,
	}
	if !d.tasks.add(cfg.ID, h) {
		cancel()
		return fmt.Errorf("task %s is already running", cfg.ID)
	}
	go h.run(ctx)
	return nil
}

func (d *Driver) RecoverTask(handle *drivers.TaskHandle) error {
	if handle == nil || handle.Config == nil {
		return errors.New("cannot recover a task without its handle")
	}
	if _, ok := d.tasks.get(handle.Config.ID); ok {
		return nil
	}
	var state TaskState
	if err := handle.GetDriverState(&state); err != nil {
		return fmt.Errorf("decoding task state: %w", err)
	}
	if state.Unit == "" {
		return errors.New("task state names no machine unit")
	}
	st, err := d.mgr.Status(d.ctx, state.Unit)
	if err != nil {
		return fmt.Errorf("recovering machine %s: %w", state.Machine, err)
	}
	m := d.recoveredMachine(state, handle.Config.AllocID)
	if !st.Loaded() {
		// An ended machine whose unit recorded its exit is recovered, so WaitTask reports it.
		if _, ok, err := m.recordedExit(); err != nil || !ok {
			return fmt.Errorf("recovering machine %s: its unit %s is gone and recorded no exit", state.Machine, state.Unit)
		}
	} else if st.InvocationID != state.InvocationID && state.Config.RebootPolicy != string(nspawn.RebootRestart) {
		return fmt.Errorf("recovering machine %s: unit %s is another invocation (%s, expected %s)", state.Machine, state.Unit, st.InvocationID, state.InvocationID)
	}
	opts, err := state.Config.options()
	if err != nil {
		return err
	}
	// A machine that got ready before the restart had its readiness reported then.
	if err := d.track(m, handle.Config, state, opts.readyTimeout, st.EverActive); err != nil {
		return err
	}
	return nil
}

func (d *Driver) WaitTask(ctx context.Context, taskID string) (<-chan *drivers.ExitResult, error) {
	h, ok := d.tasks.get(taskID)
	if !ok {
		return nil, drivers.ErrTaskNotFound
	}
	ch := make(chan *drivers.ExitResult, 1)
	go func() {
		defer close(ch)
		select {
		case <-h.doneCh:
			ch <- h.result()
		case <-ctx.Done():
		case <-d.ctx.Done():
		}
	}()
	return ch, nil
}

// StopTask ends the machine as the task's kill_signal says; the README's "Stopping a task" is
// the contract. No kill_signal, SIGTERM or SIGINT is an orderly poweroff: SIGTERM to nspawn,
// which sends SIGRTMIN+3 to the guest's PID 1. Any other signal is delivered once to the
// guest's PID 1 and nothing else is sent: what it means is the guest's business. Either way the
// machine is killed if it still runs after timeout.
func (d *Driver) StopTask(taskID string, timeout time.Duration, signal string) error {
	h, ok := d.tasks.get(taskID)
	if !ok {
		return drivers.ErrTaskNotFound
	}
	if !h.running() {
		return nil
	}
	ctx := d.ctx
	// PID 1 ignores signals it has no handler for, and a guest that is still booting (NixOS
	// stage 2, or systemd before it set up its handlers) may not have one yet, even when it
	// reports READY=1 right after: the poweroff is repeated. A guest already shutting down
	// ignores the repeats. A custom signal is not repeated: its handler need not be idempotent.
	var resend <-chan time.Time
	switch signal {
	case "", "SIGTERM", "SIGINT":
		if err := d.mgr.Kill(ctx, h.m.unit(), false, syscall.SIGTERM); err != nil {
			return fmt.Errorf("stopping machine %s: %w", h.m.name, err)
		}
		ticker := time.NewTicker(stopResendInterval)
		defer ticker.Stop()
		resend = ticker.C
	default:
		if err := d.SignalTask(taskID, signal); err != nil {
			if !h.running() {
				return nil
			}
			return fmt.Errorf("stopping machine %s with kill_signal %s: %w", h.m.name, signal, err)
		}
		h.logger.Info("sent the kill signal to the guest's PID 1", "signal", signal, "timeout", timeout)
	}
	deadline := time.After(timeout)
	for stopped := false; !stopped; {
		select {
		case <-h.doneCh:
			return nil
		case <-deadline:
			stopped = true
		case <-resend:
			if leader, err := d.mgr.Leader(h.m.name); err == nil {
				_ = syscall.Kill(leader, nspawn.SignalShutdown)
			}
		}
	}
	h.logger.Info("machine did not stop within the kill timeout, killing it", "timeout", timeout)
	if err := d.mgr.Kill(ctx, h.m.unit(), true, syscall.SIGKILL); err != nil {
		return fmt.Errorf("killing machine %s: %w", h.m.name, err)
	}
	select {
	case <-h.doneCh:
		return nil
	case <-time.After(stopTimeout):
		return fmt.Errorf("machine %s still runs %s after SIGKILL", h.m.name, stopTimeout)
	}
}

// DestroyTask removes the machine's unit, registration, root and state. It works from the task ID
// alone when the driver has no handle (for example after a failed recovery).
func (d *Driver) DestroyTask(taskID string, force bool) error {
	h, ok := d.tasks.get(taskID)
	var m *machine
	if ok {
		if h.running() && !force {
			return errors.New("cannot destroy a running task without force")
		}
		h.cancel()
		h.endForwarding()
		m = h.m
	} else {
		allocID, task, err := taskOfID(taskID)
		if err != nil {
			return err
		}
		if m, err = d.machine(allocID, task); err != nil {
			return err
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := m.remove(ctx); err != nil {
		return err
	}
	d.tasks.delete(taskID)
	return nil
}

// taskOfID splits a task ID, "<alloc ID>/<task name>/<suffix>".
func taskOfID(taskID string) (allocID, task string, err error) {
	allocID, rest, ok := strings.Cut(taskID, "/")
	i := strings.LastIndex(rest, "/")
	if !ok || i <= 0 {
		return "", "", fmt.Errorf("task ID %q is not <allocation>/<task>/<suffix>", taskID)
	}
	return allocID, rest[:i], nil
}

func (d *Driver) InspectTask(taskID string) (*drivers.TaskStatus, error) {
	h, ok := d.tasks.get(taskID)
	if !ok {
		return nil, drivers.ErrTaskNotFound
	}
	return h.status(), nil
}

// SignalTask delivers a signal to the guest's PID 1.
func (d *Driver) SignalTask(taskID string, signal string) error {
	h, ok := d.tasks.get(taskID)
	if !ok {
		return drivers.ErrTaskNotFound
	}
	sig, ok := signals.SignalLookup[signal]
	if !ok {
		return fmt.Errorf("signal %q: unknown signal name", signal)
	}
	leader, err := d.mgr.Leader(h.m.name)
	if err != nil {
		return err
	}
	return syscall.Kill(leader, sig.(syscall.Signal))
}

func (d *Driver) ExecTask(taskID string, cmd []string, timeout time.Duration) (*drivers.ExecTaskResult, error) {
	h, ok := d.tasks.get(taskID)
	if !ok {
		return nil, drivers.ErrTaskNotFound
	}
	ctx, cancel := context.WithTimeout(d.ctx, timeout)
	defer cancel()
	stdout := &limitedBuffer{max: drivers.CheckBufSize}
	stderr := &limitedBuffer{max: drivers.CheckBufSize}
	code, err := d.exec(ctx, h, nspawn.ExecOptions{Command: cmd, Stdout: stdout, Stderr: stderr})
	if err != nil {
		return nil, err
	}
	return &drivers.ExecTaskResult{
		Stdout:     stdout.buf,
		Stderr:     stderr.buf,
		ExitResult: &drivers.ExitResult{ExitCode: code},
	}, nil
}

func (d *Driver) ExecTaskStreaming(ctx context.Context, taskID string, o *drivers.ExecOptions) (*drivers.ExitResult, error) {
	h, ok := d.tasks.get(taskID)
	if !ok {
		return nil, drivers.ErrTaskNotFound
	}
	defer o.Stdout.Close()
	defer o.Stderr.Close()
	resize := make(chan nspawn.TerminalSize, 1)
	go func() {
		defer close(resize)
		for {
			select {
			case s, ok := <-o.ResizeCh:
				if !ok {
					return
				}
				resize <- nspawn.TerminalSize{Width: uint16(s.Width), Height: uint16(s.Height)}
			case <-ctx.Done():
				return
			}
		}
	}()
	code, err := d.exec(ctx, h, nspawn.ExecOptions{
		Command: o.Command, Tty: o.Tty, Stdin: o.Stdin, Stdout: o.Stdout, Stderr: o.Stderr, Resize: resize,
	})
	if err != nil {
		return nil, err
	}
	return &drivers.ExitResult{ExitCode: code}, nil
}

func (d *Driver) exec(ctx context.Context, h *taskHandle, o nspawn.ExecOptions) (int, error) {
	if !h.running() {
		return 0, fmt.Errorf("machine %s is not running", h.m.name)
	}
	leader, err := d.mgr.Leader(h.m.name)
	if err != nil {
		return 0, err
	}
	pc := d.pluginConfig()
	return nspawn.Exec(ctx, nspawn.ExecTools{SystemdRun: pc.SystemdRunPath, Nsenter: pc.NsenterPath, Self: d.self}, h.m.name, leader, o)
}

// limitedBuffer keeps the first max bytes written to it, as Nomad's script checks expect.
type limitedBuffer struct {
	buf []byte
	max int
}

func (b *limitedBuffer) Write(p []byte) (int, error) {
	if room := b.max - len(b.buf); room > 0 {
		b.buf = append(b.buf, p[:min(room, len(p))]...)
	}
	return len(p), nil
}
