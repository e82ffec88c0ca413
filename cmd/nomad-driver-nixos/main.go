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
	// Each machine's console forwarder and exec sessions are this binary too.
	if code, ok := nspawn.Helper(os.Args[1:]); ok {
		os.Exit(code)
	}
	plugins.Serve(func(logger hclog.Logger) interface{} { return driver.NewDriver(logger) })
}
