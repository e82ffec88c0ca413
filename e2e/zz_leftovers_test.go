// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

//go:build e2e

package e2e

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// This file's name sorts last, and Go runs the tests of a package file by file.

// Last: once every job is stopped and purged, nothing of the driver is left on the host.
func TestPurgeLeavesNothing(t *testing.T) {
	var jobs []struct{ ID string }
	api(t, "/v1/jobs", &jobs)
	for _, j := range jobs {
		nomad(t, "job", "stop", "-purge", j.ID)
	}
	waitOutput(t, 2*time.Minute, "clean", func() string {
		left := machinesOnHost(t)
		units := strings.TrimSpace(host(t, "sh", "-c", "systemctl list-units --all --no-legend --plain 'nomad-*' | grep -v '^nomad-e2e-agent' || true"))
		links := strings.TrimSpace(host(t, "sh", "-c", "ip -o link | grep -oE 've-nomad[^:@]*|vn-[^:@]*' || true"))
		roots := strings.TrimSpace(host(t, "sh", "-c", "ls /var/lib/nomad-driver-nixos/machines /var/lib/nomad-driver-nixos/gcroots /var/lib/nomad-driver-nixos/tmp 2>/dev/null | grep -v '^/\\|^$' || true"))
		if len(left) == 0 && units == "" && links == "" && roots == "" {
			return "clean"
		}
		return fmt.Sprintf("machines %v\nunits %s\nlinks %s\nroots %s", left, units, links, roots)
	})
}
