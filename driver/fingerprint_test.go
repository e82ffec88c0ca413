// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package driver

import (
	"testing"

	"github.com/shoenig/test/must"
)

func TestCheckSystemdVersion(t *testing.T) {
	for _, v := range []string{"252.39-1~deb12u1", "257.9-1~deb13u1", "257.5", "258", "v260~rc1"} {
		must.NoError(t, checkSystemdVersion(v), must.Sprint(v))
	}
	for v, want := range map[string]string{
		"251.4-3":   `systemd 251.4-3 is older than 252, the oldest version this driver is tested with (252 on hybrid cgroups, 257 on cgroup v2); upgrade systemd`,
		"247":       `systemd 247 is older than 252`,
		"":          `systemd reports version "", which does not start with a number; the driver needs systemd 252 or later`,
		"unknown-1": `systemd reports version "unknown-1", which does not start with a number`,
	} {
		must.ErrorContains(t, checkSystemdVersion(v), want, must.Sprint(v))
	}
}
