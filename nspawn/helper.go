// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package nspawn

// Helper runs one of the commands this binary serves besides the plugin: the console forwarder
// and the exec session starter, which must run outside the plugin process. ok is false when args
// name none of them.
func Helper(args []string) (code int, ok bool) {
	if len(args) == 0 {
		return 0, false
	}
	switch args[0] {
	case ConsoleCommand:
		return ConsoleMain(args[1:]), true
	case SessionCommand:
		return SessionMain(args[1:]), true
	}
	return 0, false
}
