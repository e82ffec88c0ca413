// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package nspawn

// Helper runs the command this binary serves besides the plugin: the exec session starter, which
// must run outside the plugin process. ok is false when args do not name it.
func Helper(args []string) (code int, ok bool) {
	if len(args) > 0 && args[0] == SessionCommand {
		return SessionMain(args[1:]), true
	}
	return 0, false
}
