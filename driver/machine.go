// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package driver

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/nomad/plugins/drivers"

	"github.com/nomad-nixos/nomad-driver-nixos/closure"
	"github.com/nomad-nixos/nomad-driver-nixos/console"
	"github.com/nomad-nixos/nomad-driver-nixos/hostnet"
	"github.com/nomad-nixos/nomad-driver-nixos/nspawn"
)

// machine is the machine of one task: its name, its allocation, and its directory under
// data_dir, which holds all of it on disk:
//
//	root/      the machine's root directory
//	store/     the store view: the closure's paths, bound one by one
//	exit       what the unit recorded when nspawn ended
//	address    the address slot of a veth machine
//	console.*  the console log and the forwarder's files (package console)
//
// Outside it are the units, the registration with machined, a veth link, port forwards and
// the importer's GC root of the closure, all named after the machine, and the staged
// credentials in credentialsRunDir/<machine>. A machine is made once
// per start (Driver.machine) or recovery (Driver.recoveredMachine) with what it depends on.
type machine struct {
	name    string
	allocID string
	dir     string

	mgr *nspawn.Manager
	// imp is the importer of the plugin config the machine was made under.
	imp    *closure.Importer
	logger hclog.Logger
}

// machinesDir holds the directories of all machines.
func machinesDir(dataDir string) string { return filepath.Join(dataDir, "machines") }

// machine is the machine of a task, whether or not it exists.
func (d *Driver) machine(allocID, task string) (*machine, error) {
	name, err := nspawn.MachineName(allocID, task)
	if err != nil {
		return nil, err
	}
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.machineAt(name, allocID, filepath.Join(machinesDir(d.config.DataDir), name)), nil
}

// recoveredMachine is the machine a task's saved state names, where the state says it is: a
// later plugin config may name another data_dir.
func (d *Driver) recoveredMachine(s TaskState, allocID string) *machine {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.machineAt(s.Machine, allocID, s.MachineDir)
}

// machineAt needs d.mu held.
func (d *Driver) machineAt(name, allocID, dir string) *machine {
	return &machine{name: name, allocID: allocID, dir: dir, mgr: d.mgr, imp: d.imp, logger: d.logger.With("machine", name)}
}

func (m *machine) unit() string           { return nspawn.UnitName(m.name) }
func (m *machine) consoleUnit() string    { return nspawn.ConsoleUnit(m.name) }
func (m *machine) root() string           { return filepath.Join(m.dir, "root") }
func (m *machine) storeView() string      { return filepath.Join(m.dir, "store") }
func (m *machine) exitFile() string       { return filepath.Join(m.dir, "exit") }
func (m *machine) addressFile() string    { return filepath.Join(m.dir, "address") }
func (m *machine) console() console.Files { return console.Files{Dir: m.dir} }
func (m *machine) credentialsDir() string { return filepath.Join(credentialsRunDir, m.name) }
func (m *machine) vethHost() string       { return hostnet.NewVeth(m.name, hostnet.Addressing{}).Host }
func (m *machine) recordedExit() (nspawn.UnitStatus, bool, error) {
	return nspawn.ReadExitFile(m.exitFile())
}

// machineLink is the driver-made network of a veth machine.
type machineLink struct {
	veth     hostnet.Veth
	forwards []hostnet.Forward
	pools    []netip.Prefix
}

func (l *machineLink) describe() string {
	var addrs []string
	for _, p := range []netip.Prefix{l.veth.Addr.GuestIPv4, l.veth.Addr.GuestIPv6} {
		if p.IsValid() {
			addrs = append(addrs, p.Addr().String())
		}
	}
	return fmt.Sprintf("machine address %s on %s (host side %s)", strings.Join(addrs, ", "), hostnet.GuestInterface, l.veth.Host)
}

// launch prepares the root and starts the unit, returning once machined registered the machine
// or the machine already ended (a guest may finish in milliseconds; its exit is reported by
// WaitTask). The handle starts the console forwarder later (see forwarderDelay).
func (m *machine) launch(ctx context.Context, cfg *drivers.TaskConfig, spec *nspawn.Spec, creds []nspawn.CredentialSource, link *machineLink) (nspawn.UnitStatus, error) {
	if err := nspawn.PrepareRoot(spec.Root); err != nil {
		return nspawn.UnitStatus{}, err
	}
	if err := nspawn.WriteMountDropins(spec.Root, spec.GuestMounts()); err != nil {
		return nspawn.UnitStatus{}, err
	}
	if err := os.WriteFile(filepath.Join(spec.Root, "etc", "resolv.conf"), resolvConf(cfg.DNS, spec.Network.Mode), 0o644); err != nil {
		return nspawn.UnitStatus{}, fmt.Errorf("writing the machine's resolv.conf: %w", err)
	}
	// The table also holds the masquerading of the machines' own outbound traffic, which a
	// machine without port forwards needs as much.
	if link != nil {
		if err := hostnet.AddForwards(m.name, link.pools, link.forwards); err != nil {
			return nspawn.UnitStatus{}, err
		}
	}
	if err := nspawn.PrepareStoreView(spec.Store); err != nil {
		return nspawn.UnitStatus{}, fmt.Errorf("preparing the machine's /nix/store: %w", err)
	}
	if cfg.TaskDir() != nil && cfg.TaskDir().SecretsDir != "" {
		skipped, err := nspawn.WriteEnvFile(filepath.Join(cfg.TaskDir().SecretsDir, envFileName), spec.Env)
		if err != nil {
			return nspawn.UnitStatus{}, fmt.Errorf("writing the task environment file: %w", err)
		}
		if len(skipped) > 0 {
			m.logger.Warn("environment variables with names systemd rejects were left out", "names", skipped)
		}
	}
	if len(creds) > 0 {
		staged, err := nspawn.StageCredentials(cfg.TaskDir().SecretsDir, m.credentialsDir(), creds)
		if err != nil {
			return nspawn.UnitStatus{}, fmt.Errorf("credentials: %w; files are read from the task's secrets directory, where a template with destination = \"secrets/<file>\" or a Vault or workload identity file puts them", err)
		}
		spec.Credentials = staged
	}
	if err := console.Prepare(m.dir); err != nil {
		return nspawn.UnitStatus{}, err
	}
	// Watched before the start, so no change is missed.
	changed, unwatch := m.mgr.WatchUnit(m.unit())
	defer unwatch()
	registered, unwatchMachine := m.mgr.WatchMachine(m.name)
	defer unwatchMachine()
	if err := m.mgr.Start(ctx, spec); err != nil {
		return nspawn.UnitStatus{}, err
	}
	deadline := time.Now().Add(registerTimeout)
	for {
		st, err := m.mgr.Status(ctx, m.unit())
		if err != nil {
			return st, err
		}
		// The invocation ID identifies this run of the unit in recovery; it is set once the
		// start job runs.
		if !st.Loaded() || (st.InvocationID != "" && !st.Running()) {
			return st, nil
		}
		if ok, _ := m.mgr.Registered(m.name); ok && st.InvocationID != "" {
			if link == nil {
				return st, nil
			}
			// nspawn made the pair before registering the machine.
			leader, err := m.mgr.Leader(m.name)
			if err == nil {
				err = link.veth.ConfigureHost()
			}
			if err == nil {
				err = link.veth.ConfigureGuest(leader)
			}
			if err != nil {
				// A machine that ended in the meantime is reported by WaitTask, not here.
				if now, serr := m.mgr.Status(ctx, m.unit()); serr == nil && !now.Running() {
					return now, nil
				}
				return st, fmt.Errorf("configuring the network of machine %s: %w", m.name, err)
			}
			return st, nil
		}
		if time.Now().After(deadline) {
			return st, fmt.Errorf("machine %s did not register with systemd-machined within %s", m.name, registerTimeout)
		}
		select {
		case <-changed:
		case <-registered:
		case <-time.After(launchPollInterval):
		case <-ctx.Done():
			return st, ctx.Err()
		}
	}
}

// remove deletes everything the machine consists of. It refuses a unit of the machine's name
// that belongs to another allocation.
func (m *machine) remove(ctx context.Context) error {
	owned := func(st nspawn.UnitStatus) error {
		if !strings.Contains(st.Description, m.allocID) {
			return fmt.Errorf("unit %s belongs to another allocation (%q), not touching it", m.unit(), st.Description)
		}
		return nil
	}
	if err := m.mgr.Remove(ctx, m.unit(), owned); err != nil {
		return err
	}
	if err := m.mgr.Remove(ctx, m.consoleUnit(), nil); err != nil {
		return err
	}
	if err := m.mgr.Terminate(m.name); err != nil {
		return fmt.Errorf("terminating machine %s: %w", m.name, err)
	}
	if err := nspawn.RemoveRoot(m.root()); err != nil {
		return err
	}
	if err := os.RemoveAll(m.dir); err != nil {
		return fmt.Errorf("removing %s: %w", m.dir, err)
	}
	if err := os.RemoveAll(m.credentialsDir()); err != nil {
		return fmt.Errorf("removing the staged credentials of machine %s: %w", m.name, err)
	}
	if err := hostnet.DeleteVeth(m.vethHost()); err != nil {
		return fmt.Errorf("removing the veth link of machine %s: %w", m.name, err)
	}
	if err := hostnet.RemoveForwards(m.name); err != nil {
		return fmt.Errorf("removing the port forwards of machine %s: %w", m.name, err)
	}
	if m.imp != nil {
		if err := m.imp.RemoveRoot(ctx, m.name); err != nil {
			return fmt.Errorf("removing the GC root of machine %s: %w", m.name, err)
		}
	}
	return nil
}

// orDevNull is where output goes that Nomad gave no log path for.
func orDevNull(path string) string {
	if path == "" {
		return os.DevNull
	}
	return path
}
