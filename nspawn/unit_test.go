// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package nspawn

import (
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/godbus/dbus/v5"
	"github.com/shoenig/test/must"
)

// unitProps returns the properties by name, failing on duplicates: systemd applies them in
// order, so a duplicate silently overrides an earlier value.
func unitProps(t *testing.T, s *Spec) map[string]dbus.Variant {
	t.Helper()
	props, err := s.UnitProperties()
	must.NoError(t, err)
	out := map[string]dbus.Variant{}
	for _, p := range props {
		_, dup := out[p.Name]
		must.False(t, dup, must.Sprintf("property %s is set twice", p.Name))
		out[p.Name] = p.Value
	}
	return out
}

// propIs checks a property's value and its D-Bus signature: systemd rejects a transient property
// of the wrong type.
func propIs(t *testing.T, props map[string]dbus.Variant, name, sig string, want any) {
	t.Helper()
	v, ok := props[name]
	must.True(t, ok, must.Sprintf("property %s is missing", name))
	must.EqOp(t, sig, v.Signature().String(), must.Sprintf("signature of %s", name))
	must.Eq(t, want, v.Value(), must.Sprintf("value of %s", name))
}

func TestUnitProperties_Base(t *testing.T) {
	s := testSpec()
	props := unitProps(t, s)

	propIs(t, props, "Type", "s", "notify")
	propIs(t, props, "KillMode", "s", "mixed")
	propIs(t, props, "KillSignal", "i", int32(15))
	propIs(t, props, "Delegate", "b", true)
	propIs(t, props, "RemainAfterExit", "b", true)
	propIs(t, props, "TimeoutStartUSec", "t", uint64(90_000_000))
	propIs(t, props, "TimeoutStopUSec", "t", uint64(30_000_000))
	propIs(t, props, "Slice", "s", "machine.slice")
	propIs(t, props, "Description", "s", s.Description)
	// Only nspawn itself: the guest reports to nspawn, which says READY=1 once the guest did.
	propIs(t, props, "NotifyAccess", "s", "main")
	propIs(t, props, "DevicePolicy", "s", "closed")
	// The console goes to a file in one stream, not to the journal, which rate-limits.
	propIs(t, props, "StandardOutputFileToAppend", "s", s.ConsoleFile)
	propIs(t, props, "StandardError", "s", "inherit")
	must.EqOp(t, "a(ss)", props["DeviceAllow"].Signature().String())
	must.EqOp(t, "a(sasb)", props["ExecStart"].Signature().String())
	must.EqOp(t, "a(sasb)", props["ExecStopPost"].Signature().String())

	// ExecStart runs exactly the nspawn command line, which has no '$' to expand.
	exec := reflect.ValueOf(props["ExecStart"].Value())
	must.EqOp(t, 1, exec.Len())
	must.EqOp(t, s.NspawnPath, exec.Index(0).FieldByName("Path").String())
	must.Eq(t, s.Args(), exec.Index(0).FieldByName("Args").Interface().([]string))
	must.True(t, exec.Index(0).FieldByName("UncleanIsFailure").Bool())

	for _, absent := range []string{
		"MemoryMax", "MemorySwapMax", "MemoryLow", "CPUWeight", "AllowedCPUs", "TasksMax",
		"RestartForceExitStatus", "ExecStartEx",
	} {
		must.MapNotContainsKey(t, props, absent)
	}
}

// A '$' anywhere in the command line (an init arg, an environment value) makes the command
// ExecStartEx with no-env-expand, so systemd runs it as it is.
func TestUnitProperties_DollarIsNotExpanded(t *testing.T) {
	for name, mutate := range map[string]func(*Spec){
		"init arg":  func(s *Spec) { s.InitArgs = append(s.InitArgs, "print=$X") },
		"env value": func(s *Spec) { s.Env["SECRET"] = "pa$$word" },
	} {
		t.Run(name, func(t *testing.T) {
			s := testSpec()
			mutate(s)
			props := unitProps(t, s)
			must.MapNotContainsKey(t, props, "ExecStart")
			must.EqOp(t, "a(sasas)", props["ExecStartEx"].Signature().String())
			exec := reflect.ValueOf(props["ExecStartEx"].Value())
			must.EqOp(t, 1, exec.Len())
			must.EqOp(t, s.NspawnPath, exec.Index(0).FieldByName("Path").String())
			must.Eq(t, s.Args(), exec.Index(0).FieldByName("Args").Interface().([]string))
			must.Eq(t, []string{"ignore-failure", "no-env-expand"}, exec.Index(0).FieldByName("Flags").Interface().([]string))
		})
	}
}

func TestUnitProperties_ReadyTimeout(t *testing.T) {
	for _, d := range []time.Duration{time.Second, 2 * time.Minute, time.Hour} {
		s := testSpec()
		s.ReadyTimeout = d
		propIs(t, unitProps(t, s), "TimeoutStartUSec", "t", uint64(d/time.Microsecond))
	}
}

func TestUnitProperties_Limits(t *testing.T) {
	cases := []struct {
		name    string
		res     Resources
		present map[string]any
		absent  []string
	}{
		{
			name:    "memory max only",
			res:     Resources{MemoryMaxBytes: 256 << 20},
			present: map[string]any{"MemoryMax": uint64(256 << 20), "MemorySwapMax": uint64(0)},
			absent:  []string{"MemoryLow", "CPUWeight", "AllowedCPUs", "TasksMax"},
		},
		{
			name:    "memory low only",
			res:     Resources{MemoryLowBytes: 128 << 20},
			present: map[string]any{"MemoryLow": uint64(128 << 20)},
			absent:  []string{"MemoryMax", "MemorySwapMax", "CPUWeight", "AllowedCPUs", "TasksMax"},
		},
		{
			name:    "memory low and max",
			res:     Resources{MemoryLowBytes: 128 << 20, MemoryMaxBytes: 512 << 20},
			present: map[string]any{"MemoryLow": uint64(128 << 20), "MemoryMax": uint64(512 << 20), "MemorySwapMax": uint64(0)},
		},
		{
			name:    "cpu weight",
			res:     Resources{CPUWeight: 39},
			present: map[string]any{"CPUWeight": uint64(39)},
			absent:  []string{"MemoryMax", "MemorySwapMax", "MemoryLow", "AllowedCPUs", "TasksMax"},
		},
		{
			name:    "allowed cpus",
			res:     Resources{AllowedCPUs: "0-2,5"},
			present: map[string]any{"AllowedCPUs": []byte{0x27}},
			absent:  []string{"MemoryMax", "CPUWeight", "TasksMax"},
		},
		{
			name:    "tasks max",
			res:     Resources{TasksMax: 16384},
			present: map[string]any{"TasksMax": uint64(16384)},
			absent:  []string{"MemoryMax", "MemoryLow", "CPUWeight", "AllowedCPUs"},
		},
	}
	sigs := map[string]string{
		"MemoryMax": "t", "MemorySwapMax": "t", "MemoryLow": "t", "CPUWeight": "t", "TasksMax": "t", "AllowedCPUs": "ay",
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s := testSpec()
			s.Resources = c.res
			props := unitProps(t, s)
			for name, want := range c.present {
				propIs(t, props, name, sigs[name], want)
			}
			for _, name := range c.absent {
				must.MapNotContainsKey(t, props, name)
			}
		})
	}
}

func TestUnitProperties_InvalidAllowedCPUs(t *testing.T) {
	s := testSpec()
	s.Resources.AllowedCPUs = "2-1"
	_, err := s.UnitProperties()
	must.Error(t, err)
	must.StrContains(t, err.Error(), `"2-1"`)
}

func TestUnitProperties_RebootPolicy(t *testing.T) {
	s := testSpec()
	s.RebootPolicy = RebootExit
	must.MapNotContainsKey(t, unitProps(t, s), "RestartForceExitStatus")

	s.RebootPolicy = RebootRestart
	props := unitProps(t, s)
	v, ok := props["RestartForceExitStatus"]
	must.True(t, ok)
	must.EqOp(t, "(aiai)", v.Signature().String())
	set := reflect.ValueOf(v.Value())
	must.Eq(t, []int32{133}, set.FieldByName("Statuses").Interface().([]int32))
	must.SliceEmpty(t, set.FieldByName("Signals").Interface().([]int32))
}

func TestUnitProperties_UnifiedCgroup(t *testing.T) {
	s := testSpec()
	s.UnifiedCgroup = false
	propIs(t, unitProps(t, s), "Environment", "as", []string{"SYSTEMD_NSPAWN_TMPFS_TMP=0"})

	s.UnifiedCgroup = true
	propIs(t, unitProps(t, s), "Environment", "as", []string{"SYSTEMD_NSPAWN_TMPFS_TMP=0", "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1"})
}

// TestUnitProperties_ExecStopPost runs the stop command as systemd would, with the variables
// systemd gives ExecStopPost, and checks what lands in the exit file.
func TestUnitProperties_ExecStopPost(t *testing.T) {
	if _, err := os.Stat("/bin/sh"); err != nil {
		t.Skip("no /bin/sh")
	}
	s := testSpec()
	dir := filepath.Join(t.TempDir(), "a dir with spaces & ampersand")
	must.NoError(t, os.Mkdir(dir, 0o755))
	s.ExitFile = filepath.Join(dir, "exit")
	must.NoError(t, s.Validate())

	v := reflect.ValueOf(unitProps(t, s)["ExecStopPost"].Value())
	must.EqOp(t, 1, v.Len())
	path := v.Index(0).FieldByName("Path").String()
	argv := v.Index(0).FieldByName("Args").Interface().([]string)
	must.EqOp(t, path, argv[0])

	cmd := exec.Command(path, argv[1:]...)
	cmd.Env = []string{"SERVICE_RESULT=exit-code", "EXIT_CODE=exited", "EXIT_STATUS=3", "PATH=" + os.Getenv("PATH")}
	out, err := cmd.CombinedOutput()
	must.NoError(t, err, must.Sprintf("output: %s", out))
	got, err := os.ReadFile(s.ExitFile)
	must.NoError(t, err)
	must.EqOp(t, "exit-code exited 3\n", string(got))
	u, ok, err := ReadExitFile(s.ExitFile)
	must.NoError(t, err)
	must.True(t, ok)
	must.EqOp(t, int32(3), u.ExecMainStatus)
}

func TestCPUMask(t *testing.T) {
	cases := []struct {
		list string
		want []byte
	}{
		{"0", []byte{0x01}},
		{"7", []byte{0x80}},
		{"8", []byte{0x00, 0x01}},
		{"0-2,5", []byte{0x27}},
		{"0-7", []byte{0xff}},
		{"0,8-9,15", []byte{0x01, 0x83}},
		{"5,0-2", []byte{0x27}},
		{"1,1,1", []byte{0x02}},
		{" 1 , 3 ", []byte{0x0a}},
		{"16", []byte{0x00, 0x00, 0x01}},
	}
	for _, c := range cases {
		t.Run(c.list, func(t *testing.T) {
			got, err := CPUMask(c.list)
			must.NoError(t, err)
			must.Eq(t, c.want, got)
		})
	}
}

func TestCPUMask_Invalid(t *testing.T) {
	for _, list := range []string{"", "a", "3-1", "-1", "1-", "1,", ",1", "1-2-3", "0x1", "8192", "1;2"} {
		t.Run(list, func(t *testing.T) {
			got, err := CPUMask(list)
			must.Error(t, err)
			must.Nil(t, got)
			must.StrContains(t, err.Error(), `"`+list+`"`)
		})
	}
}

// Volumes are idmapped binds, devices binds with a DeviceAllow= entry each besides a container's
// own, credentials --load-credential from their staged copies.
func TestStorageArgsAndDeviceAllow(t *testing.T) {
	s := testSpec()
	s.Binds = append(s.Binds,
		Bind{Source: "/srv/pg", Dest: "/var/lib/postgresql", IDMap: true},
		Bind{Source: "/srv/conf", Dest: "/etc-app", ReadOnly: true, IDMap: true})
	s.Devices = []Device{{Source: "/dev/fuse", Dest: "/dev/fuse", Access: "rwm"}, {Source: "/dev/dri/renderD128", Dest: "/dev/dri/renderD128", Access: "rw"}}
	s.Credentials = []Credential{{Name: "db-password", Path: "/run/nomad-driver-nixos/credentials/m/db-password"}}
	must.NoError(t, s.Validate())
	args := strings.Join(s.Args(), "\n")
	for _, want := range []string{
		"--bind=/srv/pg:/var/lib/postgresql:idmap",
		"--bind-ro=/srv/conf:/etc-app:idmap",
		"--bind=/dev/fuse:/dev/fuse",
		"--bind=/dev/dri/renderD128:/dev/dri/renderD128",
		"--load-credential=db-password:/run/nomad-driver-nixos/credentials/m/db-password",
	} {
		must.StrContains(t, args, want+"\n")
	}
	props := unitProps(t, s)
	must.Eq(t, []deviceAllow{{"/dev/net/tun", "rwm"}, {"char-pts", "rw"}, {"/dev/fuse", "rwm"}, {"/dev/dri/renderD128", "rw"}}, props["DeviceAllow"].Value().([]deviceAllow))

	for _, bad := range []func(*Spec){
		func(s *Spec) { s.Devices = []Device{{Source: "/dev/a:b", Dest: "/dev/a", Access: "rwm"}} },
		func(s *Spec) { s.Devices = []Device{{Source: "/dev/fuse", Dest: "/dev/fuse", Access: "x"}} },
		func(s *Spec) { s.Credentials = []Credential{{Name: "a:b", Path: "/run/x"}} },
		func(s *Spec) { s.Credentials = []Credential{{Name: "ok", Path: "relative"}} },
	} {
		s := testSpec()
		bad(s)
		must.Error(t, s.Validate())
	}
}
