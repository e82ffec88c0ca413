// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

// Command nomad-driver-nixos is the Nomad task driver plugin "nixos-nspawn".
package main

import (
	"os"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/nomad/plugins"

	"github.com/nomad-nixos/nomad-driver-nixos/driver"
	"github.com/nomad-nixos/nomad-driver-nixos/nspawn"
)

func main() {
	// Exec sessions inside machines start as this binary too (the console forwarder is a helper
	// binary of its own, embedded in the driver package).
	if code, ok := nspawn.Helper(os.Args[1:]); ok {
		os.Exit(code)
	}
	plugins.Serve(func(logger hclog.Logger) interface{} { return driver.NewDriver(logger) })
}
