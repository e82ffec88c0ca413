// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package nspawn

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"syscall"
	"time"

	sddbus "github.com/coreos/go-systemd/v22/dbus"
	"github.com/coreos/go-systemd/v22/machine1"
	"github.com/godbus/dbus/v5"
	"golang.org/x/sync/semaphore"
)

// Manager talks to systemd and systemd-machined over the system bus. It reconnects when the bus
// connection drops (a restarted dbus or machined must not strand running machines).
type Manager struct {
	mu      sync.Mutex
	systemd *sddbus.Conn
	// props reads units' properties: go-systemd's client has no way to send calls together.
	props    *dbus.Conn
	machined *machine1.Conn
	changes  changes
	// calls holds the calls awaiting systemd's or machined's reply, across all connections.
	calls *semaphore.Weighted
}

// maxCallsInFlight bounds the calls awaiting a reply: dbus-daemon refuses a connection's calls
// beyond 128 awaiting replies (max_replies_per_connection), and a hundred tasks starting at once
// each read a dozen properties together.
const maxCallsInFlight = 64

// fallbackPoll is how often a waiter reads a unit's state without a signal from systemd.
const fallbackPoll = time.Second

// NewManager returns a manager that connects lazily.
func NewManager() *Manager { return &Manager{calls: semaphore.NewWeighted(maxCallsInFlight)} }

// call waits until n more calls may await their replies; release ends the wait for them.
func (m *Manager) call(ctx context.Context, n int64) (release func(), err error) {
	if err := m.calls.Acquire(ctx, n); err != nil {
		return nil, err
	}
	return func() { m.calls.Release(n) }, nil
}

func (m *Manager) sd() (*sddbus.Conn, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.systemd != nil && m.systemd.Connected() {
		return m.systemd, nil
	}
	if m.systemd != nil {
		m.systemd.Close()
	}
	// The connection is shared by every task and outlives any one call: godbus closes a
	// connection when the context it was opened with ends, so ctx must not be that context.
	c, err := sddbus.NewSystemConnectionContext(context.Background())
	if err != nil {
		m.systemd = nil
		return nil, fmt.Errorf("connecting to systemd over D-Bus: %w", err)
	}
	m.systemd = c
	return c, nil
}

func (m *Manager) bus() (*dbus.Conn, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.props != nil && m.props.Connected() {
		return m.props, nil
	}
	if m.props != nil {
		m.props.Close()
	}
	c, err := dbus.ConnectSystemBus(dbus.WithContext(context.Background()))
	if err != nil {
		m.props = nil
		return nil, fmt.Errorf("connecting to the system bus: %w", err)
	}
	m.props = c
	return c, nil
}

func (m *Manager) md() (*machine1.Conn, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.machined != nil && m.machined.Connected() {
		return m.machined, nil
	}
	c, err := machine1.New()
	if err != nil {
		m.machined = nil
		return nil, fmt.Errorf("connecting to systemd-machined over D-Bus: %w", err)
	}
	m.machined = c
	return c, nil
}

// Close drops the connections to systemd and ends the watches' signals. go-systemd's machined
// client keeps its connection private and cannot close it, so that one ends with the process.
func (m *Manager) Close() {
	m.changes.close()
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.systemd != nil {
		m.systemd.Close()
		m.systemd = nil
	}
	if m.props != nil {
		m.props.Close()
		m.props = nil
	}
}

// WatchUnit returns a channel that receives when systemd signals a change of the unit's state
// or its removal, and a function that ends the watch. A waiter still reads the state itself,
// now and then, in case the bus was unreachable.
func (m *Manager) WatchUnit(unit string) (<-chan struct{}, func()) {
	return m.changes.watch(unitKey(unit))
}

// WatchMachine is WatchUnit for machined's registration of a machine.
func (m *Manager) WatchMachine(machine string) (<-chan struct{}, func()) {
	return m.changes.watch(machineKey(machine))
}

// SystemdVersion is the version systemd reports, e.g. "252.39-1~deb12u1".
func (m *Manager) SystemdVersion(ctx context.Context) (string, error) {
	c, err := m.sd()
	if err != nil {
		return "", err
	}
	release, err := m.call(ctx, 1)
	if err != nil {
		return "", err
	}
	defer release()
	p, err := c.GetManagerProperty("Version")
	if err != nil {
		return "", err
	}
	return strings.Trim(p, `"`), nil
}

// MachinedReachable tells whether systemd-machined answers.
func (m *Manager) MachinedReachable() error {
	c, err := m.md()
	if err != nil {
		return err
	}
	release, err := m.call(context.Background(), 1)
	if err != nil {
		return err
	}
	defer release()
	_, err = c.ListMachines()
	return err
}

// Start starts the machine's unit and returns once systemd accepted it; nspawn runs from then on.
func (m *Manager) Start(ctx context.Context, s *Spec) error {
	props, err := s.UnitProperties()
	if err != nil {
		return err
	}
	return m.StartUnit(ctx, s.Unit(), props)
}

// StartUnit starts a transient unit, refusing to replace one of the same name, which would
// belong to another task.
func (m *Manager) StartUnit(ctx context.Context, unit string, props []sddbus.Property) error {
	c, err := m.sd()
	if err != nil {
		return err
	}
	release, err := m.call(ctx, 1)
	if err != nil {
		return err
	}
	defer release()
	if _, err := c.StartTransientUnitContext(ctx, unit, "fail", props, nil); err != nil {
		return fmt.Errorf("starting unit %s: %w", unit, err)
	}
	return nil
}

// SetAllowedCPUs changes the CPUs the unit may run on (a cpuset list such as "0-2,5") for as long
// as it runs.
func (m *Manager) SetAllowedCPUs(ctx context.Context, unit, cpus string) error {
	mask, err := CPUMask(cpus)
	if err != nil {
		return err
	}
	c, err := m.sd()
	if err != nil {
		return err
	}
	release, err := m.call(ctx, 1)
	if err != nil {
		return err
	}
	defer release()
	if err := c.SetUnitPropertiesContext(ctx, unit, true, prop("AllowedCPUs", mask)); err != nil {
		return fmt.Errorf("setting AllowedCPUs=%s on unit %s: %w", cpus, unit, err)
	}
	return nil
}

// Status reads the unit's state. A unit systemd does not hold has LoadState "not-found": the
// driver's units are transient, so one it does not hold is gone. Status asks first, as a read of
// a property of such a unit makes systemd load one, search its unit directories and unload it
// again, each signalled to every subscriber, for each of the dozen reads.
//
// It reads the dozen properties it needs, not GetAll, which returns a few hundred that cost
// systemd and the plugin far more to encode and decode (about 2.5 ms of the plugin's CPU for the
// two interfaces). The reads go out together and systemd answers a connection's calls in order,
// so they cost one round trip and keep their order, though systemd may run a job between two of
// them. The invocation is read before the state, so a started invocation and a state that says
// the unit is not running mean it ended, not that its start job had yet to run; the state before
// the service's exit status, so a state that says the unit ended comes with the exit status it
// ended with; and LoadState last again, since an ended unit may be unloaded meanwhile, and what is
// read after that is a new, empty unit of the name.
func (m *Manager) Status(ctx context.Context, unit string) (UnitStatus, error) {
	known, err := m.Known(ctx, unit)
	if err != nil {
		return UnitStatus{}, err
	}
	if !known {
		return UnitStatus{LoadState: "not-found"}, nil
	}
	var u UnitStatus
	var loadAfter string
	var invocation []byte
	var activeEntered uint64
	err = m.properties(ctx, unit, []propertyRead{
		{"Unit", "LoadState", &u.LoadState},
		{"Unit", "InvocationID", &invocation},
		{"Unit", "ActiveState", &u.ActiveState},
		{"Unit", "SubState", &u.SubState},
		{"Unit", "Description", &u.Description},
		{"Unit", "ActiveEnterTimestampMonotonic", &activeEntered},
		{"Service", "Result", &u.Result},
		{"Service", "ControlGroup", &u.ControlGroup},
		{"Service", "MainPID", &u.MainPID},
		{"Service", "ExecMainCode", &u.ExecMainCode},
		{"Service", "ExecMainStatus", &u.ExecMainStatus},
		{"Unit", "LoadState", &loadAfter},
	})
	switch {
	case err != nil && (u.LoadState == "" || u.Loaded()):
		return UnitStatus{}, err
	case err != nil || loadAfter != u.LoadState || !u.Loaded():
		// Reads of a unit systemd does not know may fail; its LoadState says enough.
		return UnitStatus{LoadState: cmp.Or(loadAfter, u.LoadState)}, nil
	}
	if len(invocation) > 0 {
		u.InvocationID = fmt.Sprintf("%x", invocation)
	}
	u.EverActive = activeEntered > 0
	return u, nil
}

// propertyRead is a property of a unit's interface (Unit, Service, ...) and where to store it.
type propertyRead struct {
	iface, name string
	to          any
}

// properties reads the unit's properties, all calls sent before the first answer is awaited. On
// an error, those before the failed one are stored.
func (m *Manager) properties(ctx context.Context, unit string, reads []propertyRead) error {
	conn, err := m.bus()
	if err != nil {
		return err
	}
	release, err := m.call(ctx, int64(len(reads)))
	if err != nil {
		return err
	}
	defer release()
	obj := conn.Object(systemdBusName, dbus.ObjectPath(unitPathPrefix+sddbus.PathBusEscape(unit)))
	calls := make([]*dbus.Call, len(reads))
	for i, r := range reads {
		calls[i] = obj.GoWithContext(ctx, "org.freedesktop.DBus.Properties.Get", 0, nil, "org.freedesktop.systemd1."+r.iface, r.name)
	}
	var first error
	for i, call := range calls {
		<-call.Done
		if first != nil {
			continue
		}
		var v dbus.Variant
		err := call.Store(&v)
		if err == nil {
			err = v.Store(reads[i].to)
		}
		if err != nil {
			first = fmt.Errorf("reading %s of unit %s: %w", reads[i].name, unit, err)
		}
	}
	return first
}

// Known tells whether systemd holds the unit, without making it look for one.
func (m *Manager) Known(ctx context.Context, unit string) (bool, error) {
	conn, err := m.bus()
	if err != nil {
		return false, err
	}
	release, err := m.call(ctx, 1)
	if err != nil {
		return false, err
	}
	defer release()
	err = conn.Object(systemdBusName, "/org/freedesktop/systemd1").CallWithContext(ctx, systemdBusName+".Manager.GetUnit", 0, unit).Err
	if isNoSuchUnit(err) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("looking up unit %s: %w", unit, err)
	}
	return true, nil
}

// Kill sends sig to the unit's main process (nspawn) or to all of its processes.
func (m *Manager) Kill(ctx context.Context, unit string, all bool, sig syscall.Signal) error {
	c, err := m.sd()
	if err != nil {
		return err
	}
	who := sddbus.Main
	if all {
		who = sddbus.All
	}
	release, err := m.call(ctx, 1)
	if err != nil {
		return err
	}
	defer release()
	return c.KillUnitWithTarget(ctx, unit, who, int32(sig))
}

// Remove stops the unit if it runs, kills what is left, and unloads it (reset-failed), so its name
// is free again. It succeeds when there is no such unit. owned, unless nil, sees the status of a
// loaded unit first and refuses to touch it with an error.
func (m *Manager) Remove(ctx context.Context, unit string, owned func(UnitStatus) error) error {
	c, err := m.sd()
	if err != nil {
		return err
	}
	st, err := m.Status(ctx, unit)
	if err != nil {
		return err
	}
	if !st.Loaded() {
		return nil
	}
	if owned != nil {
		if err := owned(st); err != nil {
			return err
		}
	}
	if st.Running() {
		// Destroy is not the orderly path (StopTask is): kill at once.
		_ = m.Kill(ctx, unit, true, syscall.SIGKILL)
	}
	unloaded, unwatch := m.WatchUnit(unit)
	defer unwatch()
	done := make(chan string, 1)
	release, err := m.call(ctx, 1)
	if err != nil {
		return err
	}
	_, err = c.StopUnitContext(ctx, unit, "replace", done)
	release()
	if err != nil {
		// The kill may have ended and unloaded it already: then no stop job will report.
		if isNoSuchUnit(err) {
			return nil
		}
		return fmt.Errorf("stopping unit %s: %w", unit, err)
	}
	select {
	case <-done:
	case <-ctx.Done():
		return ctx.Err()
	}
	if release, err = m.call(ctx, 1); err != nil {
		return err
	}
	err = c.ResetFailedUnitContext(ctx, unit)
	release()
	if err != nil && !isNoSuchUnit(err) && !isNotFailed(err) {
		return fmt.Errorf("resetting unit %s: %w", unit, err)
	}
	// A stopped transient unit is collected a moment later; wait so the name is reusable.
	for {
		st, err := m.Status(ctx, unit)
		if err != nil {
			return err
		}
		if !st.Loaded() {
			return nil
		}
		select {
		case <-unloaded:
		case <-time.After(fallbackPoll):
		case <-ctx.Done():
			return fmt.Errorf("unit %s is still loaded (%s/%s): %w", unit, st.ActiveState, st.SubState, ctx.Err())
		}
	}
}

// IsUnitExists tells a start refused because a unit of the name is loaded already.
func IsUnitExists(err error) bool {
	var e dbus.Error
	return errors.As(err, &e) && e.Name == "org.freedesktop.systemd1.UnitExists"
}

func isNoSuchUnit(err error) bool {
	var e dbus.Error
	return errors.As(err, &e) && e.Name == "org.freedesktop.systemd1.NoSuchUnit"
}

func isNotFailed(err error) bool {
	var e dbus.Error
	return errors.As(err, &e) && strings.HasSuffix(e.Name, "UnitNotFailed")
}

// Leader is the host PID of the machine's PID 1.
func (m *Manager) Leader(machine string) (int, error) {
	c, err := m.md()
	if err != nil {
		return 0, err
	}
	release, err := m.call(context.Background(), 1)
	if err != nil {
		return 0, err
	}
	props, err := c.DescribeMachine(machine)
	release()
	if err != nil {
		return 0, fmt.Errorf("machine %s: %w", machine, err)
	}
	pid, ok := props["Leader"].(uint32)
	if !ok || pid == 0 {
		return 0, fmt.Errorf("machine %s has no leader process", machine)
	}
	return int(pid), nil
}

// Registered tells whether machined knows the machine.
func (m *Manager) Registered(machine string) (bool, error) {
	c, err := m.md()
	if err != nil {
		return false, err
	}
	release, err := m.call(context.Background(), 1)
	if err != nil {
		return false, err
	}
	_, err = c.GetMachine(machine)
	release()
	if err != nil {
		var e dbus.Error
		if errors.As(err, &e) && strings.HasSuffix(e.Name, "NoSuchMachine") {
			return false, nil
		}
		return false, err
	}
	return true, nil
}

// Terminate drops a machine registration that outlived its unit. No such machine is no error.
func (m *Manager) Terminate(machine string) error {
	ok, err := m.Registered(machine)
	if err != nil || !ok {
		return err
	}
	c, err := m.md()
	if err != nil {
		return err
	}
	release, err := m.call(context.Background(), 1)
	if err != nil {
		return err
	}
	defer release()
	return c.TerminateMachine(machine)
}
