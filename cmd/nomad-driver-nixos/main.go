// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

// Command nomad-driver-nixos is the Nomad task driver plugin "nixos-nspawn".
package main

import (
	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/nomad/plugins"

	"github.com/nomad-nixos/nomad-driver-nixos/driver"
)

func main() {
	plugins.Serve(func(logger hclog.Logger) interface{} { return driver.NewDriver(logger) })
}
