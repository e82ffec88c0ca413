// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package driver

import (
	"testing"

	"github.com/shoenig/test/must"

	"github.com/nomad-nixos/nomad-driver-nixos/nspawn"
)

func TestPrivileges(t *testing.T) {
	cases := []struct {
		name string
		pc   PluginConfig
		tc   TaskConfig
		mode string
		want nspawn.Privileges
	}{
		{name: "defaults change nothing", mode: nspawn.NetworkVeth},
		{
			name: "names in any spelling; a default added is no flag",
			tc:   TaskConfig{CapAdd: []string{"net_admin", "CAP_CHOWN"}, CapDrop: []string{"NET_RAW", "cap_sys_boot"}},
			mode: nspawn.NetworkVeth,
			want: nspawn.Privileges{DropCaps: []string{"CAP_NET_RAW", "CAP_SYS_BOOT"}},
		},
		{
			name: "an added capability the operator allows",
			pc:   PluginConfig{allowCaps: append(nspawn.DefaultCapabilities(nspawn.NetworkVeth), "CAP_SYS_TIME")},
			tc:   TaskConfig{CapAdd: []string{"SYS_TIME"}},
			mode: nspawn.NetworkVeth,
			want: nspawn.Privileges{AddCaps: []string{"CAP_SYS_TIME"}},
		},
		{
			name: "defaults left out of allow_caps are dropped for every task",
			pc:   PluginConfig{allowCaps: []string{"CAP_CHOWN", "CAP_KILL"}},
			mode: nspawn.NetworkHost,
			want: nspawn.Privileges{DropCaps: []string{
				"CAP_AUDIT_CONTROL", "CAP_AUDIT_WRITE", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER",
				"CAP_FSETID", "CAP_IPC_OWNER", "CAP_LEASE", "CAP_LINUX_IMMUTABLE", "CAP_MKNOD",
				"CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_RAW", "CAP_SETFCAP", "CAP_SETGID",
				"CAP_SETPCAP", "CAP_SETUID", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_CHROOT",
				"CAP_SYS_NICE", "CAP_SYS_PTRACE", "CAP_SYS_RESOURCE", "CAP_SYS_TTY_CONFIG",
			}},
		},
		{
			name: "system calls denied freely, added when allowed",
			pc:   PluginConfig{AllowSystemCalls: []string{"@clock"}},
			tc:   TaskConfig{SystemCallFilter: []string{"~@debug", "@clock", "~sethostname"}, NoNewPrivileges: true},
			mode: nspawn.NetworkVeth,
			want: nspawn.Privileges{AllowSystemCalls: []string{"@clock"}, DenySystemCalls: []string{"@debug", "sethostname"}, NoNewPrivileges: true},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tc.tc.privileges(tc.pc, tc.mode)
			must.NoError(t, err)
			must.Eq(t, tc.want, got)
		})
	}
}

func TestPrivileges_Refused(t *testing.T) {
	cases := []struct {
		name string
		pc   PluginConfig
		tc   TaskConfig
		want string
	}{
		{"unknown capability", PluginConfig{}, TaskConfig{CapAdd: []string{"FLY"}}, `cap_add[0] = "FLY": not a Linux capability`},
		{"all is no capability", PluginConfig{}, TaskConfig{CapAdd: []string{"all"}}, `cap_add[0] = "all": not a Linux capability`},
		{"outside allow_caps", PluginConfig{}, TaskConfig{CapAdd: []string{"SYS_MODULE"}}, `cap_add[0] = "SYS_MODULE": not allowed by the plugin config (allow_caps: CAP_AUDIT_CONTROL,`},
		{"a default the operator left out", PluginConfig{allowCaps: []string{"CAP_CHOWN"}}, TaskConfig{CapAdd: []string{"SYS_ADMIN"}}, `ask the operator to add it to allow_caps`},
		{"added and dropped", PluginConfig{}, TaskConfig{CapAdd: []string{"CHOWN"}, CapDrop: []string{"CAP_CHOWN"}}, `cap_add[0] = "CHOWN": also in cap_drop`},
		{"unknown dropped", PluginConfig{}, TaskConfig{CapDrop: []string{"CAP_"}}, `cap_drop[0] = "CAP_": not a Linux capability`},
		{"adding system calls", PluginConfig{}, TaskConfig{SystemCallFilter: []string{"@clock"}}, `system_call_filter[0] = "@clock": adding system calls is not allowed by the plugin config (allow_system_calls: []); deny calls with "~@clock"`},
		{"a list in one entry", PluginConfig{}, TaskConfig{SystemCallFilter: []string{"~@debug @clock"}}, `system_call_filter[0] = "~@debug @clock": must be a system call or an @group name`},
		{"a double denial", PluginConfig{}, TaskConfig{SystemCallFilter: []string{"~~x"}}, `system_call_filter[0] = "~~x": must be`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := tc.tc.privileges(tc.pc, nspawn.NetworkVeth)
			must.ErrorContains(t, err, tc.want)
		})
	}
}

func TestPluginConfigPrivileges_Refused(t *testing.T) {
	_, err := parseAllowCaps([]string{"NET_ADMIN", "all"})
	must.ErrorContains(t, err, `allow_caps[1] = "all": not a Linux capability; write names such as "NET_ADMIN" or "CAP_NET_ADMIN", each one on its own (there is no "all")`)
	must.ErrorContains(t, parseAllowSystemCalls([]string{"~@clock"}), `allow_system_calls[0] = "~@clock": must be a system call or an @group name`)
	caps, err := parseAllowCaps([]string{"net_admin", "CAP_NET_ADMIN", "chown"})
	must.NoError(t, err)
	must.Eq(t, []string{"CAP_CHOWN", "CAP_NET_ADMIN"}, caps)
}
