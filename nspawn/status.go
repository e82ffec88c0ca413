// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package nspawn

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"regexp"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// UnitStatus is what systemd knows about a machine's unit.
type UnitStatus struct {
	LoadState    string
	ActiveState  string
	SubState     string
	Result       string
	InvocationID string
	Description  string
	MainPID      uint32
	ControlGroup string
	// ExecMainCode is a CLD_* code: exited, killed or dumped.
	ExecMainCode   int32
	ExecMainStatus int32
	// EverActive is true once the unit reached "active", i.e. the guest got ready.
	EverActive bool
}

// Loaded is false when systemd has no such unit.
func (u UnitStatus) Loaded() bool { return u.LoadState == "loaded" }

// Running is true while nspawn runs: starting, ready, stopping, or about to boot again.
func (u UnitStatus) Running() bool {
	switch u.ActiveState {
	case "activating", "deactivating", "reloading":
		return true
	case "active":
		return u.SubState != "exited"
	}
	return false
}

// Ready is true once the guest reported READY=1.
func (u UnitStatus) Ready() bool { return u.ActiveState == "active" && u.SubState == "running" }

// Exit is how a machine ended.
type Exit struct {
	Code      int
	Signal    int
	OOMKilled bool
	// NotReady is set when the guest did not get ready within the ready timeout.
	NotReady bool
}

const (
	cldExited = 1
	cldKilled = 2
	cldDumped = 3
)

var terminatedBySignal = regexp.MustCompile(`Container \S+ terminated by signal (\w+)\.`)

// ExitOf reads the exit of an ended unit. console is the tail of the machine's console: nspawn
// reports a guest PID 1 killed by a signal only there, as exit status 1.
func ExitOf(u UnitStatus, console []string) (Exit, error) {
	var e Exit
	switch u.ExecMainCode {
	case cldExited:
		e.Code = int(u.ExecMainStatus)
	case cldKilled, cldDumped:
		e.Signal = int(u.ExecMainStatus)
		e.Code = 128 + e.Signal
	default:
		// Only a start timeout may end without nspawn's status; anything else (systemd could not
		// spawn nspawn, a start limit) never ran the machine and must not look like exit 0.
		if u.Result != "timeout" || u.EverActive {
			return e, fmt.Errorf("unit %s ended (result %q) without an exit status", u.Description, u.Result)
		}
	}
	switch u.Result {
	case "timeout":
		e.NotReady = !u.EverActive
	case "oom-kill":
		e.OOMKilled = true
	}
	if e.Code == 1 && e.Signal == 0 {
		for i := len(console) - 1; i >= 0; i-- {
			if m := terminatedBySignal.FindStringSubmatch(console[i]); m != nil {
				if sig := unix.SignalNum("SIG" + strings.TrimPrefix(m[1], "SIG")); sig != 0 {
					e.Signal = int(sig)
					e.Code = 128 + e.Signal
				}
				break
			}
		}
	}
	return e, nil
}

// ReadExitFile reads the result the unit recorded when nspawn ended (see Spec.ExitFile), for a
// unit systemd already unloaded. ok is false when nothing was recorded.
func ReadExitFile(path string) (u UnitStatus, ok bool, err error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return u, false, nil
	}
	if err != nil {
		return u, false, err
	}
	f := strings.Fields(string(b))
	if len(f) != 3 {
		return u, false, fmt.Errorf("exit file %s: want \"RESULT CODE STATUS\", got %q", path, b)
	}
	// A unit that was unloaded ended with a stop, which only follows an active unit.
	u = UnitStatus{LoadState: "recorded", ActiveState: "inactive", SubState: "dead", Result: f[0], EverActive: true}
	switch f[1] {
	case "exited":
		u.ExecMainCode = cldExited
	case "killed":
		u.ExecMainCode = cldKilled
	case "dumped":
		u.ExecMainCode = cldDumped
	default:
		return u, false, fmt.Errorf("exit file %s: unknown exit code kind %q", path, f[1])
	}
	if n, err := strconv.Atoi(f[2]); err == nil {
		u.ExecMainStatus = int32(n)
	} else if sig := unix.SignalNum("SIG" + strings.TrimPrefix(f[2], "SIG")); sig != 0 {
		u.ExecMainStatus = int32(sig)
	} else {
		return u, false, fmt.Errorf("exit file %s: unknown exit status %q", path, f[2])
	}
	return u, true, nil
}
