// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

//go:build integration

package driver

import (
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/shoenig/test/must"

	"github.com/nomad-nixos/nomad-driver-nixos/nspawn"
)

// guestPrivileges boots a tiny guest that reports its privileges and tries sethostname(2), which
// needs CAP_SYS_ADMIN and a system call nspawn's filter allows, and returns what it printed.
func guestPrivileges(t *testing.T, td *testDriver, opts ...taskOpt) (capEff uint64, line, sethostname string) {
	t.Helper()
	cfg := td.newTask(t, "privs", tinyToplevel(t), []string{"privileges", "sethostname=probe", "exit=0"}, opts...)
	// No line starts with NUL: every line is one of the "other" lines.
	stream := readConsole(t, taskFIFO(t, cfg), "\x00", "", nil, strict, nil)
	td.start(t, cfg)
	s := waitStream(t, stream, 2*time.Minute)
	res := td.waitExit(t, cfg.ID, time.Minute)
	must.NoError(t, res.Err)
	must.EqOp(t, 0, res.ExitCode, must.Sprint(s))
	for _, l := range s.other {
		if rest, ok := strings.CutPrefix(l, "tinyinit: CapEff="); ok {
			line = l
			hex, _, _ := strings.Cut(rest, " ")
			v, err := strconv.ParseUint(hex, 16, 64)
			must.NoError(t, err, must.Sprint(l))
			capEff = v
		}
		if rest, ok := strings.CutPrefix(l, "tinyinit: sethostname "); ok {
			sethostname = rest
		}
	}
	must.NotEq(t, "", line, must.Sprint(s))
	must.NotEq(t, "", sethostname, must.Sprint(s))
	return capEff, line, sethostname
}

func capMask(names ...string) uint64 {
	var m uint64
	for _, n := range names {
		m |= 1 << slices.Index(nspawn.Capabilities, n)
	}
	return m
}

// Each control with a guest that tries what it forbids, on the real systemd-nspawn.
func TestGuestPrivileges(t *testing.T) {
	allowTime := func(pc *PluginConfig) {
		pc.AllowCaps = append(nspawn.DefaultCapabilities(nspawn.NetworkVeth), "SYS_TIME")
	}
	td := newTestDriver(t, "", allowTime)
	defaults := capMask(nspawn.DefaultCapabilities(nspawn.NetworkVeth)...)

	t.Run("the documented defaults", func(t *testing.T) {
		caps, line, sethostname := guestPrivileges(t, td)
		must.EqOp(t, defaults, caps, must.Sprint(line))
		must.StrContains(t, line, "NoNewPrivs=0")
		must.StrContains(t, line, "Seccomp=2")
		must.EqOp(t, "ok", sethostname)
	})
	t.Run("cap_drop", func(t *testing.T) {
		caps, line, sethostname := guestPrivileges(t, td, withConfig(func(tc *TaskConfig) { tc.CapDrop = []string{"SYS_ADMIN"} }))
		must.EqOp(t, defaults&^capMask("CAP_SYS_ADMIN"), caps, must.Sprint(line))
		must.EqOp(t, "operation not permitted", sethostname)
	})
	t.Run("cap_add within allow_caps", func(t *testing.T) {
		caps, line, _ := guestPrivileges(t, td, withConfig(func(tc *TaskConfig) { tc.CapAdd = []string{"CAP_SYS_TIME"} }))
		must.EqOp(t, defaults|capMask("CAP_SYS_TIME"), caps, must.Sprint(line))
	})
	t.Run("system_call_filter denies", func(t *testing.T) {
		caps, line, sethostname := guestPrivileges(t, td, withConfig(func(tc *TaskConfig) { tc.SystemCallFilter = []string{"~sethostname"} }))
		must.EqOp(t, defaults, caps, must.Sprint(line))
		must.EqOp(t, "operation not permitted", sethostname)
	})
	t.Run("no_new_privileges", func(t *testing.T) {
		_, line, _ := guestPrivileges(t, td, withConfig(func(tc *TaskConfig) { tc.NoNewPrivileges = true }))
		must.StrContains(t, line, "NoNewPrivs=1")
	})
	t.Run("allow_caps without a default drops it for every task", func(t *testing.T) {
		narrow := newTestDriver(t, "", func(pc *PluginConfig) {
			pc.AllowCaps = slices.DeleteFunc(nspawn.DefaultCapabilities(nspawn.NetworkVeth), func(c string) bool { return c == "CAP_SYS_ADMIN" })
		})
		caps, line, sethostname := guestPrivileges(t, narrow)
		must.EqOp(t, defaults&^capMask("CAP_SYS_ADMIN"), caps, must.Sprint(line))
		must.EqOp(t, "operation not permitted", sethostname)
	})
	t.Run("refusals leave nothing behind", func(t *testing.T) {
		before := inventory(t, td.dataDir)
		for _, c := range []struct {
			mutate func(*TaskConfig)
			want   string
		}{
			{func(tc *TaskConfig) { tc.CapAdd = []string{"SYS_MODULE"} }, `cap_add[0] = "SYS_MODULE": not allowed by the plugin config`},
			{func(tc *TaskConfig) { tc.SystemCallFilter = []string{"@clock"} }, `system_call_filter[0] = "@clock": adding system calls is not allowed`},
		} {
			cfg := td.newTask(t, "privs", tinyToplevel(t), nil, withConfig(c.mutate))
			_, _, err := td.StartTask(cfg)
			must.ErrorContains(t, err, c.want)
		}
		must.SliceEmpty(t, leftovers(t, td.dataDir, before))
	})
}
