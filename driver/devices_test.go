// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package driver

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/shoenig/test/must"

	"github.com/nomad-nixos/nomad-driver-nixos/nspawn"
)

func TestMachineDevices(t *testing.T) {
	got, err := machineDevices(&TaskConfig{Devices: []string{"/dev/null"}},
		[]*drivers.DeviceConfig{{HostPath: "/dev/zero", TaskPath: "/dev/accel0", Permissions: "rw"}}, []string{"/dev/fuse", "/dev/null"})
	must.NoError(t, err)
	must.Eq(t, []nspawn.Device{
		{Source: "/dev/null", Dest: "/dev/null", Access: "rwm"},
		{Source: "/dev/zero", Dest: "/dev/accel0", Access: "rw"},
	}, got)

	link := filepath.Join(t.TempDir(), "null")
	must.NoError(t, os.Symlink("/dev/null", link))
	for _, c := range []struct {
		name    string
		tc      TaskConfig
		nomad   []*drivers.DeviceConfig
		allowed []string
		want    string
	}{
		{"not allowed", TaskConfig{Devices: []string{"/dev/kvm"}}, nil, []string{"/dev/fuse", "/dev/net/tun"},
			`devices[0] = "/dev/kvm": not allowed by the plugin config (allow_devices: /dev/fuse, /dev/net/tun); ask the operator to add it to allow_devices`},
		{"nothing allowed", TaskConfig{Devices: []string{"/dev/fuse"}}, nil, nil, `devices[0] = "/dev/fuse": not allowed by the plugin config (allow_devices: none)`},
		{"twice", TaskConfig{Devices: []string{"/dev/null", "/dev/null"}}, nil, []string{"/dev/null"}, `devices[1] = "/dev/null": given twice`},
		{"not a device", TaskConfig{Devices: []string{"/dev/shm"}}, nil, []string{"/dev/shm"}, `devices[0] = "/dev/shm": a d`},
		{"missing", TaskConfig{Devices: []string{"/dev/no-such-device"}}, nil, []string{"/dev/no-such-device"}, "no such file or directory"},
		{"a Nomad device outside /dev", TaskConfig{}, []*drivers.DeviceConfig{{HostPath: link, TaskPath: "/dev/x"}}, nil, "both must be clean absolute paths under /dev"},
		{"a Nomad device with bad permissions", TaskConfig{}, []*drivers.DeviceConfig{{HostPath: "/dev/null", TaskPath: "/dev/null", Permissions: "rwx"}}, nil, `permissions "rwx"`},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := machineDevices(&c.tc, c.nomad, c.allowed)
			must.ErrorContains(t, err, c.want)
		})
	}
}

func TestParseAllowDevices(t *testing.T) {
	must.NoError(t, parseAllowDevices([]string{"/dev/fuse", "/dev/net/tun", "/dev/kvm"}))
	for _, bad := range []string{"fuse", "/dev", "/dev/", "/etc/passwd", "/dev/../etc/shadow", "/dev/a:b"} {
		must.ErrorContains(t, parseAllowDevices([]string{"/dev/fuse", bad}), `allow_devices[1] = "`+bad+`"`)
	}
}
