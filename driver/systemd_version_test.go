// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package driver

import (
	"testing"

	"github.com/shoenig/test/must"
)

func TestSystemdProblem(t *testing.T) {
	for _, v := range []string{"252.39-1~deb12u1", "257.9", "257", "258.5", "258.12", "259.2", "259.4-1", "260", "261.1"} {
		must.EqOp(t, "", systemdProblem(v), must.Sprint(v))
	}
	for _, v := range []string{"258", "258.4", "258.4-2", "259", "259.1"} {
		must.EqOp(t, "systemd "+v+" has CVE-2026-40223 (a unit with Delegate=yes and no User= can make PID 1 fail an assertion, and every machine unit is such a unit); upgrade to 258.5, 259.2, 260 or later", systemdProblem(v))
	}
	must.EqOp(t, `systemd version "v252": no major version`, systemdProblem("v252"))
}
