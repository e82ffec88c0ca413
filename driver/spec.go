// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package driver

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"sort"
	"strings"

	"github.com/hashicorp/nomad/plugins/drivers"

	"github.com/nomad-nixos/nomad-driver-nixos/cgroupfs"
	"github.com/nomad-nixos/nomad-driver-nixos/nspawn"
)

// reservedEnv are variables that nspawn or the guest's systemd give a meaning of their own.
var reservedEnv = []string{"container", "container_uuid", "container_host_", "NOTIFY_SOCKET", "LISTEN_", "SYSTEMD_"}

// machineSpec translates a Nomad task into the machine that runs it.
func (d *Driver) machineSpec(m *machine, cfg *drivers.TaskConfig, tc *TaskConfig, o taskOptions, store nspawn.StoreView) (*nspawn.Spec, error) {
	pc := d.pluginConfig()
	d.mu.RLock()
	cgroupMode := d.cgroups.Mode
	d.mu.RUnlock()
	id := sha256.Sum256([]byte(cfg.AllocID + "/" + cfg.Name))
	s := &nspawn.Spec{
		Machine:       m.name,
		Description:   fmt.Sprintf("Nomad task %s of allocation %s (job %s)", cfg.Name, cfg.AllocID, cfg.JobName),
		Root:          m.root(),
		ExitFile:      m.exitFile(),
		ConsoleFile:   m.console().Log(),
		Toplevel:      tc.Toplevel,
		InitArgs:      tc.InitArgs,
		UUID:          hex.EncodeToString(id[:16]),
		NspawnPath:    pc.NspawnPath,
		Slice:         pc.Slice,
		PrivateUsers:  o.privateUsers,
		Env:           guestEnv(cfg.Env),
		UnifiedCgroup: cgroupMode == cgroupfs.CgroupUnified,
		ReadyTimeout:  o.readyTimeout,
		StopTimeout:   stopTimeout,
		RebootPolicy:  o.rebootPolicy,
		Resources:     resources(cfg.Resources, pc.TasksMax),
		Store:         store,
		Privileges:    o.privileges,
	}
	var err error
	if s.Network, err = machineNetwork(cfg, tc, o, pc, m.name); err != nil {
		return nil, err
	}
	if dir := cfg.TaskDir(); dir != nil {
		s.Binds = []nspawn.Bind{
			{Source: dir.SharedAllocDir, Dest: "/alloc"},
			// Logs are Nomad's: a guest that could swap them for symlinks could make the host
			// write elsewhere.
			{Source: dir.LogDir, Dest: "/alloc/logs", ReadOnly: true},
			{Source: dir.LocalDir, Dest: "/local"},
			{Source: dir.SecretsDir, Dest: "/secrets"},
		}
	}
	volumes, err := volumeBinds(cfg.Mounts)
	if err != nil {
		return nil, err
	}
	binds, err := taskBinds(tc.Binds, pc.allowBindPaths)
	if err != nil {
		return nil, err
	}
	if err := distinctDests(volumes, binds); err != nil {
		return nil, err
	}
	s.Binds = append(append(s.Binds, volumes...), binds...)
	if s.Devices, err = machineDevices(tc, cfg.Devices, pc.AllowDevices); err != nil {
		return nil, err
	}
	if err := s.Validate(); err != nil {
		return nil, err
	}
	return s, nil
}

// guestEnv is the task environment PID 1 gets: all of it but the names leftOutEnv reports.
func guestEnv(env map[string]string) map[string]string {
	out := make(map[string]string, len(env))
	for k, v := range env {
		if envLeftOut(k) == "" {
			out[k] = v
		}
	}
	return out
}

// leftOutEnv lists the variables guestEnv leaves out, each with the reason, for a task event:
// Nomad itself makes names such as NOMAD_META_<key> with the key's dots and dashes, so
// refusing the task for them would refuse any job with such a meta key.
func leftOutEnv(env map[string]string) []string {
	var out []string
	for k := range env {
		if why := envLeftOut(k); why != "" {
			out = append(out, fmt.Sprintf("%q (%s)", k, why))
		}
	}
	sort.Strings(out)
	return out
}

// envLeftOut says why the variable name cannot be given to the guest, or "" if it can.
func envLeftOut(name string) string {
	if !nspawn.ValidEnvName(name) {
		return "systemd takes only names of letters, digits and '_', not starting with a digit"
	}
	if isReservedEnv(name) {
		return "nspawn or the guest's systemd gives it a meaning of its own"
	}
	return ""
}

func isReservedEnv(name string) bool {
	for _, r := range reservedEnv {
		if name == r || (strings.HasSuffix(r, "_") && strings.HasPrefix(name, r)) {
			return true
		}
	}
	return false
}

// resources maps Nomad's resources onto the unit's limits, as Nomad's own drivers do: memory is
// the hard limit, unless memory_max is set; then memory is protected (MemoryLow) and memory_max is
// the hard limit.
func resources(r *drivers.Resources, tasksMax int64) nspawn.Resources {
	out := nspawn.Resources{TasksMax: uint64(max(tasksMax, 0))}
	if r == nil || r.NomadResources == nil {
		return out
	}
	mem := r.NomadResources.Memory
	const mib = 1 << 20
	switch {
	case mem.MemoryMaxMB > 0:
		out.MemoryLowBytes = uint64(mem.MemoryMB) * mib
		out.MemoryMaxBytes = uint64(mem.MemoryMaxMB) * mib
	case mem.MemoryMaxMB < 0:
		// -1: no hard limit (oversubscription with unlimited memory_max).
		out.MemoryLowBytes = uint64(mem.MemoryMB) * mib
	case mem.MemoryMB > 0:
		out.MemoryMaxBytes = uint64(mem.MemoryMB) * mib
	}
	out.CPUWeight = cpuWeight(r.NomadResources.Cpu.CpuShares)
	// Reserved cores pin a task from its start; a task on the shared cores follows Nomad's share
	// partition as it changes (followSharedCPUs).
	out.AllowedCPUs = reservedCPUs(r.LinuxResources)
	return out
}

// reservedCPUs are the task's reserved cores, "" for a task on Nomad's shared cores.
func reservedCPUs(lr *drivers.LinuxResources) string {
	if lr != nil && lr.CpusetCpus != "" && strings.Contains(lr.CpusetCgroupPath, "reserve") {
		return lr.CpusetCpus
	}
	return ""
}

// cpuWeight converts cgroup v1 CPU shares (what Nomad's cpu MHz become) to a cgroup v2 weight with
// the kernel's own formula, so weights compare across tasks as shares did.
func cpuWeight(shares int64) uint64 {
	if shares <= 0 {
		return 0
	}
	w := 1 + ((shares-2)*9999)/262142
	return uint64(min(max(w, 1), 10000))
}
