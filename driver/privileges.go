// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package driver

import (
	"fmt"
	"regexp"
	"slices"
	"strings"

	"github.com/nomad-nixos/nomad-driver-nixos/nspawn"
)

// systemCallName is a system call or a systemd @group, as systemd-analyze syscall-filter lists them.
var systemCallName = regexp.MustCompile(`^@?[a-z0-9_-]{1,64}$`)

// parseAllowCaps checks the plugin config's allow_caps; none given means nspawn's own defaults.
func parseAllowCaps(list []string) ([]string, error) {
	if list == nil {
		return nil, nil
	}
	out := make([]string, 0, len(list))
	for i, c := range list {
		name, ok := nspawn.CapabilityName(c)
		if !ok {
			return nil, fmt.Errorf("allow_caps[%d] = %q: not a Linux capability; write names such as \"NET_ADMIN\" or \"CAP_NET_ADMIN\", each one on its own (there is no \"all\")", i, c)
		}
		out = append(out, name)
	}
	slices.Sort(out)
	return slices.Compact(out), nil
}

func parseAllowSystemCalls(list []string) error {
	for i, s := range list {
		if !systemCallName.MatchString(s) {
			return fmt.Errorf("allow_system_calls[%d] = %q: must be a system call or an @group name as `systemd-analyze syscall-filter` lists them, such as \"@clock\" or \"sethostname\"", i, s)
		}
	}
	return nil
}

// privileges is what the task's cap_add, cap_drop, system_call_filter and no_new_privileges ask
// of nspawn, within what the plugin config allows. A guest's capabilities are nspawn's defaults
// for its network mode, plus cap_add, minus cap_drop; every one of them must be in allow_caps,
// so a default the operator left out of allow_caps is dropped for every task.
func (c *TaskConfig) privileges(pc PluginConfig, networkMode string) (nspawn.Privileges, error) {
	var p nspawn.Privileges
	defaults := nspawn.DefaultCapabilities(networkMode)
	allowed := pc.allowCaps
	if allowed == nil {
		allowed = defaults
	}
	drop := map[string]bool{}
	for i, s := range c.CapDrop {
		name, ok := nspawn.CapabilityName(s)
		if !ok {
			return p, fmt.Errorf("cap_drop[%d] = %q: not a Linux capability; write names such as \"NET_RAW\" or \"CAP_NET_RAW\"", i, s)
		}
		drop[name] = true
	}
	add := map[string]bool{}
	for i, s := range c.CapAdd {
		name, ok := nspawn.CapabilityName(s)
		switch {
		case !ok:
			return p, fmt.Errorf("cap_add[%d] = %q: not a Linux capability; write names such as \"NET_ADMIN\" or \"CAP_NET_ADMIN\"", i, s)
		case drop[name]:
			return p, fmt.Errorf("cap_add[%d] = %q: also in cap_drop; give each capability once", i, s)
		case !slices.Contains(allowed, name):
			return p, fmt.Errorf("cap_add[%d] = %q: not allowed by the plugin config (allow_caps: %s); ask the operator to add it to allow_caps", i, s, strings.Join(allowed, ", "))
		}
		add[name] = true
	}
	for _, name := range defaults {
		if !slices.Contains(allowed, name) {
			drop[name] = true
		}
	}
	for name := range add {
		if !slices.Contains(defaults, name) {
			p.AddCaps = append(p.AddCaps, name)
		}
	}
	for name := range drop {
		if slices.Contains(defaults, name) {
			p.DropCaps = append(p.DropCaps, name)
		}
	}
	slices.Sort(p.AddCaps)
	slices.Sort(p.DropCaps)
	for i, s := range c.SystemCallFilter {
		name, deny := strings.CutPrefix(s, "~")
		switch {
		case !systemCallName.MatchString(name):
			return p, fmt.Errorf("system_call_filter[%d] = %q: must be a system call or an @group name as `systemd-analyze syscall-filter` lists them, with \"~\" in front to deny it, such as \"~@debug\"", i, s)
		case deny:
			p.DenySystemCalls = append(p.DenySystemCalls, name)
		case !slices.Contains(pc.AllowSystemCalls, name):
			return p, fmt.Errorf("system_call_filter[%d] = %q: adding system calls is not allowed by the plugin config (allow_system_calls: [%s]); deny calls with \"~%s\", or ask the operator to add %q to allow_system_calls", i, s, strings.Join(pc.AllowSystemCalls, ", "), name, name)
		default:
			p.AllowSystemCalls = append(p.AllowSystemCalls, name)
		}
	}
	p.NoNewPrivileges = c.NoNewPrivileges
	return p, nil
}
