// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package driver

import (
	"os"
	"strings"
	"testing"

	"github.com/hashicorp/nomad/helper/pluginutils/hclutils"
	"github.com/hashicorp/nomad/plugins/shared/hclspec"
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

// The e2e agents run with the README's plugin and telemetry blocks, to the letter.
func TestREADMEAgentConfigIsTheE2EConfig(t *testing.T) {
	for _, file := range []string{"../e2e/agent/agent.hcl", "../e2e/cluster/client.hcl"} {
		agent, err := os.ReadFile(file)
		must.NoError(t, err)
		for _, header := range []string{`plugin "nomad-driver-nixos" {`, "telemetry {"} {
			must.Eq(t, block(t, readme(t), header), block(t, string(agent), header), must.Sprint(file))
		}
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

// optionRows reads the option tables of a README section: the option name, its type and its
// default, from rows like "| `name` | type | default | meaning |".
func optionRows(t *testing.T, section string) map[string][2]string {
	t.Helper()
	text := readme(t)
	start := strings.Index(text, section)
	must.NonNegative(t, start, must.Sprintf("the README has no %q section", section))
	text = text[start+len(section):]
	if end := strings.Index(text, "\n## "); end >= 0 {
		text = text[:end]
	}
	rows := map[string][2]string{}
	for _, line := range strings.Split(text, "\n") {
		cells := strings.Split(line, "|")
		if len(cells) < 5 || !strings.HasPrefix(strings.TrimSpace(cells[1]), "`") {
			continue
		}
		name := strings.Trim(strings.TrimSpace(cells[1]), "`")
		rows[name] = [2]string{strings.TrimSpace(cells[2]), strings.Trim(strings.TrimSpace(cells[3]), "`\"")}
	}
	return rows
}

// The README's option tables list exactly the schema's options, with their types and defaults.
func TestREADMEOptionTablesMatchTheSchemas(t *testing.T) {
	for _, tc := range []struct {
		section string
		spec    *hclspec.Spec
	}{
		{"## Task configuration", taskConfigSpec},
		{"### Agent configuration", pluginConfigSpec},
	} {
		rows := optionRows(t, tc.section)
		attrs := tc.spec.GetObject().GetAttributes()
		must.MapLen(t, len(attrs), rows, must.Sprintf("%s: %v", tc.section, rows))
		for name, spec := range attrs {
			row, ok := rows[name]
			must.True(t, ok, must.Sprintf("%s does not document %s", tc.section, name))
			attr, def := spec.GetAttr(), ""
			if d := spec.GetDefault(); d != nil {
				attr, def = d.GetPrimary().GetAttr(), strings.Trim(d.GetDefault().GetLiteral().GetValue(), `"`)
			}
			typ := attr.GetType()
			if spec.GetBlockList() != nil {
				typ = "blocks"
			}
			must.Eq(t, typ, row[0], must.Sprintf("type of %s", name))
			if def != "" {
				must.Eq(t, def, row[1], must.Sprintf("default of %s", name))
			}
		}
	}
}
