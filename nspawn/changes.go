// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package nspawn

import (
	"sync"
	"time"

	sddbus "github.com/coreos/go-systemd/v22/dbus"
	"github.com/godbus/dbus/v5"
)

// changes wakes those who wait for a unit or a machine when systemd or machined signals a change
// to it, so that no one polls PID 1: polling every machine's unit every few milliseconds made
// systemd the bottleneck of concurrent starts and of many running machines. It has a bus
// connection of its own, subscribed to systemd's unit signals, and reconnects when the bus drops
// it; every waiter is woken then, since changes may have been missed.
type changes struct {
	mu      sync.Mutex
	conn    *dbus.Conn
	running bool
	closed  bool
	waiters map[string]map[chan struct{}]struct{}
}

// reconnectDelay is how long changes waits before it connects again after losing the bus.
const reconnectDelay = time.Second

const (
	systemdBusName = "org.freedesktop.systemd1"
	machinedBus    = "org.freedesktop.machine1"
	unitPathPrefix = "/org/freedesktop/systemd1/unit/"
)

func unitKey(unit string) string           { return "unit " + unitPathPrefix + sddbus.PathBusEscape(unit) }
func unitPathKey(p dbus.ObjectPath) string { return "unit " + string(p) }
func machineKey(machine string) string     { return "machine " + machine }

// watch registers a waiter for key and starts following the bus if no one did yet. The channel
// holds one pending wake-up: several changes before a receive are one.
func (c *changes) watch(key string) (<-chan struct{}, func()) {
	ch := make(chan struct{}, 1)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.waiters == nil {
		c.waiters = map[string]map[chan struct{}]struct{}{}
	}
	if c.waiters[key] == nil {
		c.waiters[key] = map[chan struct{}]struct{}{}
	}
	c.waiters[key][ch] = struct{}{}
	if !c.running && !c.closed {
		c.running = true
		go c.follow()
	}
	return ch, func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		delete(c.waiters[key], ch)
		if len(c.waiters[key]) == 0 {
			delete(c.waiters, key)
		}
	}
}

func (c *changes) wake(key string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for ch := range c.waiters[key] {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
}

func (c *changes) wakeAll() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, chs := range c.waiters {
		for ch := range chs {
			select {
			case ch <- struct{}{}:
			default:
			}
		}
	}
}

// follow delivers the bus's signals until close. Waiters keep a slow poll of their own, which
// covers the time the bus cannot be reached.
func (c *changes) follow() {
	for {
		signals, err := c.connect()
		if err == nil {
			c.wakeAll()
			for s := range signals {
				c.dispatch(s)
			}
		}
		c.mu.Lock()
		closed := c.closed
		c.conn = nil
		c.mu.Unlock()
		if closed {
			return
		}
		c.wakeAll()
		time.Sleep(reconnectDelay)
	}
}

func (c *changes) connect() (<-chan *dbus.Signal, error) {
	conn, err := dbus.ConnectSystemBus()
	if err != nil {
		return nil, err
	}
	signals := make(chan *dbus.Signal, 256)
	conn.Signal(signals)
	for _, match := range [][]dbus.MatchOption{
		// systemd signals a unit's change twice, for its type's interface (Service, ...) and
		// then for Unit: Unit's alone wakes a waiter once both are done, at half the messages.
		{dbus.WithMatchSender(systemdBusName), dbus.WithMatchInterface("org.freedesktop.DBus.Properties"),
			dbus.WithMatchMember("PropertiesChanged"), dbus.WithMatchPathNamespace(dbus.ObjectPath(unitPathPrefix[:len(unitPathPrefix)-1])),
			dbus.WithMatchArg(0, systemdBusName+".Unit")},
		{dbus.WithMatchSender(systemdBusName), dbus.WithMatchInterface(systemdBusName + ".Manager"), dbus.WithMatchMember("UnitRemoved")},
		{dbus.WithMatchSender(machinedBus), dbus.WithMatchInterface(machinedBus + ".Manager"), dbus.WithMatchMember("MachineNew")},
		{dbus.WithMatchSender(machinedBus), dbus.WithMatchInterface(machinedBus + ".Manager"), dbus.WithMatchMember("MachineRemoved")},
	} {
		if err := conn.AddMatchSignal(match...); err != nil {
			conn.Close()
			return nil, err
		}
	}
	// systemd signals unit changes only while someone subscribed; the subscription ends with
	// the connection.
	if err := conn.Object(systemdBusName, "/org/freedesktop/systemd1").Call(systemdBusName+".Manager.Subscribe", 0).Err; err != nil {
		conn.Close()
		return nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		conn.Close()
		return nil, dbus.ErrClosed
	}
	c.conn = conn
	return signals, nil
}

func (c *changes) dispatch(s *dbus.Signal) {
	switch s.Name {
	case "org.freedesktop.DBus.Properties.PropertiesChanged":
		c.wake(unitPathKey(s.Path))
	case systemdBusName + ".Manager.UnitRemoved":
		if len(s.Body) == 2 {
			if p, ok := s.Body[1].(dbus.ObjectPath); ok {
				c.wake(unitPathKey(p))
			}
		}
	case machinedBus + ".Manager.MachineNew", machinedBus + ".Manager.MachineRemoved":
		if len(s.Body) == 2 {
			if name, ok := s.Body[0].(string); ok {
				c.wake(machineKey(name))
			}
		}
	}
}

// close ends following the bus for good.
func (c *changes) close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	if c.conn != nil {
		c.conn.Close()
	}
}
