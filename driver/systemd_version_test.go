// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package driver

import (
	"testing"

	"github.com/shoenig/test/must"
)

func TestSystemdProblem(t *testing.T) {
	for _, v := range []string{"252.39-1~deb12u1", "257.9-1~deb13u1", "257.9", "257", "258.5", "258.12", "259.2", "259.4-1", "260", "v260~rc1", "261.1"} {
		must.EqOp(t, "", systemdProblem(v), must.Sprint(v))
	}
	for _, v := range []string{"258", "258.4", "258.4-2", "259", "259.1"} {
		must.EqOp(t, "systemd "+v+" has CVE-2026-40223 (a unit with Delegate=yes and no User= can make PID 1 fail an assertion, and every machine unit is such a unit); upgrade to 258.5, 259.2, 260 or later", systemdProblem(v))
	}
	for v, want := range map[string]string{
		"251.4-3":   `systemd 251.4-3 is older than 252, the oldest version this driver is tested with (252 on hybrid cgroups, 257 on cgroup v2); upgrade systemd`,
		"247":       `systemd 247 is older than 252`,
		"":          `systemd reports version "", which does not start with a number; the driver needs systemd 252 or later`,
		"unknown-1": `systemd reports version "unknown-1", which does not start with a number`,
	} {
		must.StrContains(t, systemdProblem(v), want, must.Sprint(v))
	}
}
