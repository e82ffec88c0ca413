// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

//go:build integration

package driver

import (
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/nomad/plugins/base"
	"github.com/shoenig/test/must"
	"github.com/shoenig/test/wait"

	"github.com/nomad-nixos/nomad-driver-nixos/console"
	"github.com/nomad-nixos/nomad-driver-nixos/nspawn"
)

var exposureLine = regexp.MustCompile(`Overall exposure level for \S+: ([0-9.]+)`)

// exposure is the overall exposure level `systemd-analyze security` gives the unit.
func exposure(t *testing.T, unit string) float64 {
	t.Helper()
	out, err := exec.Command("systemd-analyze", "security", "--no-pager", unit).CombinedOutput()
	// It exits non-zero for a unit above its threshold; the figure is what counts.
	m := exposureLine.FindSubmatch(out)
	must.NotNil(t, m, must.Sprintf("systemd-analyze security %s: %v\n%s", unit, err, out))
	v, err := strconv.ParseFloat(string(m[1]), 64)
	must.NoError(t, err)
	t.Logf("%s: exposure %.1f\n%s", unit, v, out)
	return v
}

// The console forwarder reads its machine's log and writes Nomad's FIFOs, and nothing else: it
// scores 2.0 or lower, and the console still arrives whole through it.
func TestForwarderConfined(t *testing.T) {
	td := newTestDriver(t, "")
	cfg := td.newTask(t, "confined", tinyToplevel(t), []string{"lines=1000", "print=confined done", "sleep=20s", "exit=0"})
	stream := readConsole(t, taskFIFO(t, cfg), "tinyinit line ", "confined done", nil, strict, nil)
	td.start(t, cfg)
	unit := nspawn.ConsoleUnit(mustMachine(t, cfg))
	must.Wait(t, wait.InitialSuccess(wait.BoolFunc(func() bool {
		out, _ := exec.Command("systemctl", "is-active", unit).Output()
		return string(out) == "active\n"
	}), wait.Timeout(30*time.Second), wait.Gap(100*time.Millisecond)))
	must.LessEq(t, 2.0, exposure(t, unit))

	s := waitStream(t, stream, 2*time.Minute)
	must.EqOp(t, "", s.disorder, must.Sprint(s))
	must.EqOp(t, 1000, s.count, must.Sprint(s))
	must.SliceContains(t, s.other, "confined done", must.Sprint(s))
	res := td.waitExit(t, cfg.ID, time.Minute)
	must.NoError(t, res.Err)
	must.EqOp(t, 0, res.ExitCode)
}

// The files the driver writes can be read by root alone, except the environment file, which the
// guest's services read through a bind where host root's files belong to nobody.
func TestFileModes(t *testing.T) {
	dataDir := filepath.Join(t.TempDir(), "made-by-the-driver")
	td := newTestDriver(t, dataDir)
	cfg := td.newTask(t, "modes", tinyToplevel(t), []string{"print=modes", "exit=0"})
	cfg.Env = map[string]string{"SECRET": "s3cret"}
	td.start(t, cfg)
	res := td.waitExit(t, cfg.ID, time.Minute)
	must.NoError(t, res.Err)
	dir := td.machineDir(t, cfg)
	files := console.Files{Dir: dir}
	helpers, err := filepath.Glob(filepath.Join(dataDir, "bin", "console-*"))
	must.NoError(t, err)
	must.Len(t, 1, helpers)
	want := map[string]fs.FileMode{
		dataDir:                       0o700 | fs.ModeDir,
		filepath.Join(dataDir, "bin"): 0o700 | fs.ModeDir,
		helpers[0]:                    0o700,
		filepath.Dir(dir):             0o700 | fs.ModeDir,
		dir:                           0o700 | fs.ModeDir,
		filepath.Join(dir, "exit"):    0o600,
		filepath.Join(dir, "address"): 0o600,
		files.Log():                   0o600,
		files.Offset():                0o600,
		files.End():                   0o600,
		filepath.Join(cfg.TaskDir().SecretsDir, envFileName): 0o644,
	}
	for path, mode := range want {
		fi, err := os.Lstat(path)
		must.NoError(t, err)
		must.EqOp(t, mode, fi.Mode(), must.Sprint(path))
	}
}

// A data_dir that every user can write to is refused: root runs what it holds.
func TestDataDirWritableByOthers(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "open")
	must.NoError(t, os.Mkdir(dir, 0o777))
	must.NoError(t, os.Chmod(dir, 0o777))
	d := NewDriver(hclog.NewNullLogger())
	defer d.Shutdown()
	pc := readmePluginConfig(t)
	pc.DataDir = dir
	var raw []byte
	must.NoError(t, base.MsgPackEncode(&raw, &pc))
	err := d.SetConfig(&base.Config{PluginConfig: raw})
	must.ErrorContains(t, err, `data_dir = "`+dir+`": writable by every user (mode 0777), who could replace what root runs from it; run `+"`chmod o-w "+dir+"`")
	entries, err := os.ReadDir(dir)
	must.NoError(t, err)
	must.SliceEmpty(t, entries)
}

// The machine's unit is at most as exposed as the stock systemd-nspawn@.service on the same
// host, which systemd ships for machines nspawn boots from /var/lib/machines.
func TestMachineUnitExposure(t *testing.T) {
	td := newTestDriver(t, "")
	cfg := td.newTask(t, "exposure", tinyToplevel(t), nil)
	td.start(t, cfg)
	machine := exposure(t, nspawn.UnitName(mustMachine(t, cfg)))
	stock := exposure(t, "systemd-nspawn@exposure-probe.service")
	must.LessEq(t, stock, machine)
}
