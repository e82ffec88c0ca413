// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package nspawn

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/shoenig/test/must"
)

func TestUnitStatus_RunningReady(t *testing.T) {
	cases := []struct {
		active, sub    string
		running, ready bool
	}{
		{"activating", "start", true, false},
		{"activating", "auto-restart", true, false},
		{"active", "running", true, true},
		{"active", "exited", false, false},
		{"reloading", "reload", true, false},
		{"deactivating", "stop-sigterm", true, false},
		{"deactivating", "stop-post", true, false},
		{"inactive", "dead", false, false},
		{"failed", "failed", false, false},
		{"", "", false, false},
	}
	for _, c := range cases {
		t.Run(c.active+"/"+c.sub, func(t *testing.T) {
			u := UnitStatus{LoadState: "loaded", ActiveState: c.active, SubState: c.sub}
			must.EqOp(t, c.running, u.Running())
			must.EqOp(t, c.ready, u.Ready())
		})
	}
}

func TestUnitStatus_Loaded(t *testing.T) {
	must.True(t, UnitStatus{LoadState: "loaded"}.Loaded())
	for _, s := range []string{"not-found", "", "error", "masked"} {
		must.False(t, UnitStatus{LoadState: s}.Loaded())
	}
}

func TestExitOf(t *testing.T) {
	cases := []struct {
		name    string
		unit    UnitStatus
		console []string
		want    Exit
	}{
		{"exit 0", UnitStatus{Result: "success", ExecMainCode: cldExited, ExecMainStatus: 0}, nil, Exit{}},
		{"exit 3", UnitStatus{Result: "exit-code", ExecMainCode: cldExited, ExecMainStatus: 3}, nil, Exit{Code: 3}},
		{"exit 42", UnitStatus{Result: "exit-code", ExecMainCode: cldExited, ExecMainStatus: 42}, nil, Exit{Code: 42}},
		{"reboot 133", UnitStatus{Result: "exit-code", ExecMainCode: cldExited, ExecMainStatus: 133}, nil, Exit{Code: 133}},
		{"killed by SIGKILL", UnitStatus{Result: "signal", ExecMainCode: cldKilled, ExecMainStatus: 9}, nil, Exit{Code: 137, Signal: 9}},
		{"killed by SIGTERM", UnitStatus{Result: "signal", ExecMainCode: cldKilled, ExecMainStatus: 15}, nil, Exit{Code: 143, Signal: 15}},
		{"dumped SIGABRT", UnitStatus{Result: "core-dump", ExecMainCode: cldDumped, ExecMainStatus: 6}, nil, Exit{Code: 134, Signal: 6}},
		{
			"start timeout, never ready",
			UnitStatus{Result: "timeout", ExecMainCode: cldKilled, ExecMainStatus: 9, EverActive: false},
			nil, Exit{Code: 137, Signal: 9, NotReady: true},
		},
		{
			"start timeout without an exit status",
			UnitStatus{Result: "timeout", EverActive: false},
			nil, Exit{NotReady: true},
		},
		{
			"stop timeout after it was ready",
			UnitStatus{Result: "timeout", ExecMainCode: cldKilled, ExecMainStatus: 9, EverActive: true},
			nil, Exit{Code: 137, Signal: 9},
		},
		{"oom kill", UnitStatus{Result: "oom-kill", ExecMainCode: cldKilled, ExecMainStatus: 9}, nil, Exit{Code: 137, Signal: 9, OOMKilled: true}},
		{"oom kill, nspawn exited 1", UnitStatus{Result: "oom-kill", ExecMainCode: cldExited, ExecMainStatus: 1}, nil, Exit{Code: 1, OOMKilled: true}},
		{
			"guest PID 1 killed: only the console tells",
			UnitStatus{Result: "exit-code", ExecMainCode: cldExited, ExecMainStatus: 1},
			[]string{"[  OK  ] Reached target Multi-User System.", "Container nomad-x terminated by signal KILL."},
			Exit{Code: 137, Signal: 9},
		},
		{
			"guest PID 1 killed, later lines follow",
			UnitStatus{Result: "exit-code", ExecMainCode: cldExited, ExecMainStatus: 1},
			[]string{"Container nomad-3f2504e0-web terminated by signal SEGV.", "some trailing line"},
			Exit{Code: 139, Signal: 11},
		},
		{
			"the last console report counts",
			UnitStatus{Result: "exit-code", ExecMainCode: cldExited, ExecMainStatus: 1},
			[]string{"Container nomad-x terminated by signal KILL.", "Container nomad-x terminated by signal TERM."},
			Exit{Code: 143, Signal: 15},
		},
		{
			"exit 1 without a console report",
			UnitStatus{Result: "exit-code", ExecMainCode: cldExited, ExecMainStatus: 1},
			[]string{"Failed to start something.", "terminated by signal KILL"},
			Exit{Code: 1},
		},
		{
			"unknown signal name leaves exit 1",
			UnitStatus{Result: "exit-code", ExecMainCode: cldExited, ExecMainStatus: 1},
			[]string{"Container nomad-x terminated by signal BOGUS."},
			Exit{Code: 1},
		},
		{
			"console report ignored for another exit status",
			UnitStatus{Result: "exit-code", ExecMainCode: cldExited, ExecMainStatus: 2},
			[]string{"Container nomad-x terminated by signal KILL."},
			Exit{Code: 2},
		},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, err := ExitOf(c.unit, c.console)
			must.NoError(t, err)
			must.Eq(t, c.want, got)
		})
	}
}

func TestExitOf_NoExitStatus(t *testing.T) {
	for _, result := range []string{"success", ""} {
		t.Run(result, func(t *testing.T) {
			_, err := ExitOf(UnitStatus{Description: "Nomad task web", Result: result}, nil)
			must.Error(t, err)
		})
	}
}

// A unit that failed before nspawn ever ran (for example Result "resources": systemd could not
// spawn the process) has no exit status. Reporting it as a clean exit 0 would make Nomad count
// a machine that never ran as a successful task.
func TestExitOf_FailedWithoutExitStatusIsNotSuccess(t *testing.T) {
	for _, result := range []string{"resources", "start-limit-hit", "exit-code", "protocol"} {
		t.Run(result, func(t *testing.T) {
			got, err := ExitOf(UnitStatus{Description: "Nomad task web", Result: result}, nil)
			if err == nil {
				must.True(t, got.Code != 0 || got.Signal != 0 || got.NotReady,
					must.Sprintf("unit with Result=%q and no exit status reported as success: %+v", result, got))
			}
		})
	}
}

func TestReadExitFile(t *testing.T) {
	cases := []struct {
		content string
		code    int32
		status  int32
		result  string
		exit    Exit
	}{
		{"success exited 0\n", cldExited, 0, "success", Exit{}},
		{"exit-code exited 3\n", cldExited, 3, "exit-code", Exit{Code: 3}},
		{"exit-code exited 133\n", cldExited, 133, "exit-code", Exit{Code: 133}},
		// systemd gives the signal name without "SIG" for killed and dumped processes.
		{"signal killed KILL\n", cldKilled, 9, "signal", Exit{Code: 137, Signal: 9}},
		{"signal killed SIGTERM\n", cldKilled, 15, "signal", Exit{Code: 143, Signal: 15}},
		{"core-dump dumped ABRT\n", cldDumped, 6, "core-dump", Exit{Code: 134, Signal: 6}},
		{"oom-kill killed 9\n", cldKilled, 9, "oom-kill", Exit{Code: 137, Signal: 9, OOMKilled: true}},
		// A timeout that ended an unloaded (stopped) unit came after it was active.
		{"timeout killed KILL\n", cldKilled, 9, "timeout", Exit{Code: 137, Signal: 9}},
	}
	for _, c := range cases {
		t.Run(c.content, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "exit")
			must.NoError(t, os.WriteFile(path, []byte(c.content), 0o644))
			u, ok, err := ReadExitFile(path)
			must.NoError(t, err)
			must.True(t, ok)
			must.EqOp(t, c.result, u.Result)
			must.EqOp(t, c.code, u.ExecMainCode)
			must.EqOp(t, c.status, u.ExecMainStatus)
			must.False(t, u.Running())
			exit, err := ExitOf(u, nil)
			must.NoError(t, err)
			must.Eq(t, c.exit, exit)
		})
	}
}

func TestReadExitFile_Missing(t *testing.T) {
	_, ok, err := ReadExitFile(filepath.Join(t.TempDir(), "exit"))
	must.NoError(t, err)
	must.False(t, ok)
}

func TestReadExitFile_Malformed(t *testing.T) {
	for _, content := range []string{
		"",
		"success exited\n",
		// What ExecStopPost writes when the main process never ran: no code, no status.
		"resources  \n",
		"success exited 0 extra\n",
		"success stopped 0\n",
		"signal killed NOSUCHSIG\n",
		"success exited x\n",
	} {
		t.Run(content, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "exit")
			must.NoError(t, os.WriteFile(path, []byte(content), 0o644))
			_, ok, err := ReadExitFile(path)
			must.Error(t, err)
			must.False(t, ok)
			must.StrContains(t, err.Error(), path)
		})
	}
}
