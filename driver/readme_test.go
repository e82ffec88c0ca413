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

// block returns the HCL block of text that starts with header, braces included.
func block(t *testing.T, text, header string) string {
	t.Helper()
	start := strings.Index(text, header)
	must.NonNegative(t, start, must.Sprintf("no %q block", header))
	depth := 0
	for i, r := range text[start:] {
		switch r {
		case '{':
			depth++
		case '}':
			depth--
			if depth == 0 {
				return text[start : start+i+1]
			}
		}
	}
	t.Fatalf("the %q block is not closed", header)
	return ""
}

func readme(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("../README.md")
	must.NoError(t, err)
	return string(b)
}

// readmePluginConfig is the plugin config of the README's agent configuration, parsed with the
// plugin's schema. The integration tests run the driver with it, so the README shows exactly
// what is tested.
func readmePluginConfig(t *testing.T) PluginConfig {
	t.Helper()
	plugin := block(t, readme(t), `plugin "nomad-driver-nixos" {`)
	var c PluginConfig
	hclutils.NewConfigParser(pluginConfigSpec).ParseHCL(t, block(t, plugin, "config {"), &c)
	return c
}

// The e2e agent runs with the README's plugin and telemetry blocks, to the letter.
func TestREADMEAgentConfigIsTheE2EConfig(t *testing.T) {
	agent, err := os.ReadFile("../e2e/agent/agent.hcl")
	must.NoError(t, err)
	for _, header := range []string{`plugin "nomad-driver-nixos" {`, "telemetry {"} {
		must.Eq(t, block(t, readme(t), header), block(t, string(agent), header))
	}
}

func TestREADMEPluginConfig(t *testing.T) {
	c := readmePluginConfig(t)
	must.NoError(t, c.validate())
	must.True(t, c.Enabled)
	must.Eq(t, defaultDataDir, c.DataDir)
	must.Eq(t, defaultSlice, c.Slice)
	must.Eq(t, int64(defaultTasksMax), c.TasksMax)
}
