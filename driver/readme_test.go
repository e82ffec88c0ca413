// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package driver

import (
	"os"
	"strings"
	"testing"

	"github.com/hashicorp/nomad/helper/pluginutils/hclutils"
	"github.com/shoenig/test/must"
)

// readmePluginConfig is the plugin config of the README's agent configuration, parsed with the
// plugin's schema. The integration tests run the driver with it, so the README shows exactly
// what is tested.
func readmePluginConfig(t *testing.T) PluginConfig {
	t.Helper()
	b, err := os.ReadFile("../README.md")
	must.NoError(t, err)
	_, rest, ok := strings.Cut(string(b), `plugin "nomad-driver-nixos" {`)
	must.True(t, ok, must.Sprint("the README has no plugin block"))
	start := strings.Index(rest, "config {")
	must.Positive(t, start+1, must.Sprint("the README's plugin block has no config block"))
	depth, end := 0, -1
	for i, r := range rest[start:] {
		switch r {
		case '{':
			depth++
		case '}':
			depth--
			if depth == 0 && end < 0 {
				end = start + i + 1
			}
		}
	}
	must.Positive(t, end, must.Sprint("the README's config block is not closed"))
	var c PluginConfig
	hclutils.NewConfigParser(pluginConfigSpec).ParseHCL(t, rest[start:end], &c)
	return c
}

func TestREADMEPluginConfig(t *testing.T) {
	c := readmePluginConfig(t)
	must.NoError(t, c.validate())
	must.True(t, c.Enabled)
	must.Eq(t, defaultDataDir, c.DataDir)
	must.Eq(t, defaultSlice, c.Slice)
	must.Eq(t, int64(defaultTasksMax), c.TasksMax)
}
