// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package nspawn

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"regexp"
	"strings"
)

// NamePrefix marks machines and units that belong to this driver.
const NamePrefix = "nomad-"

// maxMachineName is machined's limit: a machine name is a valid hostname of at most 64 characters.
const maxMachineName = 64

// MachineName derives the machine name of a task from its allocation ID and task name. It is
// deterministic, so a task can be found and destroyed by name even when the driver lost its state.
// The allocation prefix comes first so one allocation's machines sort together in machinectl.
func MachineName(allocID, taskName string) (string, error) {
	alloc := sanitize(allocID)
	if len(alloc) < 8 {
		return "", fmt.Errorf("allocation ID %q is too short to name a machine", allocID)
	}
	task := sanitize(taskName)
	// A lossy sanitisation or truncation could map two task names to one machine name; a short
	// hash of the original keeps them apart.
	room := maxMachineName - len(NamePrefix) - 8 - 1
	// A name that already ends like a hash suffix gets one too, or "Web!" and "web-95a2bd"
	// would both become "web-95a2bd".
	if task != taskName || len(task) > room || task == "" || hashSuffix.MatchString(task) {
		sum := sha256.Sum256([]byte(taskName))
		suffix := hex.EncodeToString(sum[:3])
		if len(task) > room-len(suffix)-1 {
			task = strings.TrimRight(task[:room-len(suffix)-1], "-")
		}
		if task == "" {
			task = suffix
		} else {
			task += "-" + suffix
		}
	}
	return NamePrefix + alloc[:8] + "-" + task, nil
}

var hashSuffix = regexp.MustCompile(`-[0-9a-f]{6}$`)

// UnitName is the transient service unit that runs a machine.
func UnitName(machine string) string {
	return machine + ".service"
}

// sanitize keeps [a-z0-9-], lowercases letters and turns every other run of characters into one dash.
func sanitize(s string) string {
	var b strings.Builder
	dash := false
	for _, r := range strings.ToLower(s) {
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9':
			b.WriteRune(r)
			dash = false
		default:
			if !dash && b.Len() > 0 {
				b.WriteByte('-')
				dash = true
			}
		}
	}
	return strings.TrimRight(b.String(), "-")
}
