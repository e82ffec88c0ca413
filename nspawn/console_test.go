// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package nspawn

import (
	"reflect"
	"testing"

	"github.com/shoenig/test/must"
)

func TestForwarderUnitProperties(t *testing.T) {
	f := &Forwarder{
		Helper:     "/var/lib/nomad-driver-nixos/bin/console-0123456789abcdef",
		MachineDir: "/var/lib/nomad-driver-nixos/machines/nomad-3f2504e0-web",
		FIFO:       "/var/lib/nomad/alloc/3f2504e0/alloc/logs/.web.stdout.fifo",
		StderrFIFO: "/var/lib/nomad/alloc/3f2504e0/alloc/logs/.web.stderr.fifo",
		Backlog:    1 << 30,
	}
	props := map[string]any{}
	for _, p := range f.UnitProperties("nomad-3f2504e0-web.service") {
		_, dup := props[p.Name]
		must.False(t, dup, must.Sprintf("property %s is set twice", p.Name))
		props[p.Name] = p.Value.Value()
	}
	must.EqOp(t, "on-failure", props["Restart"].(string))
	must.EqOp(t, "Console of nomad-3f2504e0-web.service", props["Description"].(string))
	exec := reflect.ValueOf(props["ExecStart"])
	must.EqOp(t, 1, exec.Len())
	argv := exec.Index(0).FieldByName("Args").Interface().([]string)
	// systemd reads this flag as "ignore failure": a failed forwarder must be restarted.
	must.False(t, exec.Index(0).FieldByName("UncleanIsFailure").Bool())
	must.Eq(t, []string{
		f.Helper, "-dir", f.MachineDir, "-fifo", f.FIFO, "-stderr-fifo", f.StderrFIFO, "-backlog", "1073741824B",
	}, argv)
	must.EqOp(t, "nomad-3f2504e0-web-console.service", ConsoleUnit("nomad-3f2504e0-web"))
	must.NotEq(t, UnitName("nomad-3f2504e0-web"), ConsoleUnit("nomad-3f2504e0-web"))
}

// A task named with a '$' gets FIFO paths with one: systemd must run them as they are.
func TestForwarderUnitProperties_Dollar(t *testing.T) {
	f := &Forwarder{Helper: "/h", MachineDir: "/m", FIFO: "/a/.w$HOME.stdout.fifo", StderrFIFO: "/a/.w$HOME.stderr.fifo", Backlog: 1}
	for _, p := range f.UnitProperties("u.service") {
		must.NotEq(t, "ExecStart", p.Name)
		if p.Name != "ExecStartEx" {
			continue
		}
		exec := reflect.ValueOf(p.Value.Value())
		must.Eq(t, []string{"no-env-expand"}, exec.Index(0).FieldByName("Flags").Interface().([]string))
		must.SliceContains(t, exec.Index(0).FieldByName("Args").Interface().([]string), f.FIFO)
		return
	}
	t.Fatal("no ExecStartEx")
}

// The forwarder writes only its machine directory; a private /tmp or an empty /home is left out
// where they would hide a path it uses.
func TestForwarderSandbox(t *testing.T) {
	props := func(f Forwarder) map[string]any {
		out := map[string]any{}
		for _, p := range f.UnitProperties("u.service") {
			out[p.Name] = p.Value.Value()
		}
		return out
	}
	p := props(Forwarder{Helper: "/var/lib/d/bin/console", MachineDir: "/var/lib/d/machines/m", FIFO: "/var/lib/nomad/a/.w.stdout.fifo", StderrFIFO: "/dev/null"})
	must.Eq(t, uint64(0), p["CapabilityBoundingSet"].(uint64))
	must.EqOp(t, "strict", p["ProtectSystem"].(string))
	must.Eq(t, []string{"/var/lib/d/machines/m"}, p["ReadWritePaths"].([]string))
	must.Eq(t, allowList{Allow: true, Items: []string{"AF_UNIX"}}, p["RestrictAddressFamilies"].(allowList))
	must.Eq(t, allowList{Allow: true, Items: []string{"@system-service"}}, p["SystemCallFilter"].(allowList))
	must.True(t, p["PrivateTmp"].(bool))
	must.EqOp(t, "yes", p["ProtectHome"].(string))

	p = props(Forwarder{Helper: "/var/lib/d/bin/console", MachineDir: "/tmp/d/machines/m", FIFO: "/home/n/a/.w.stdout.fifo", StderrFIFO: "/dev/null"})
	_, private := p["PrivateTmp"]
	must.False(t, private)
	must.EqOp(t, "read-only", p["ProtectHome"].(string))
	must.False(t, underAny([]string{"/tmpfoo/x"}, "/tmp"))
}
