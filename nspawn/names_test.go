// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package nspawn

import (
	"regexp"
	"strings"
	"testing"

	"github.com/shoenig/test/must"
)

const testAllocID = "3F2504E0-4F89-11D3-9A0C-0305E82C3301"

// validMachineName is what machined accepts and what the driver promises: lowercase letters,
// digits and dashes, no leading or trailing dash, at most 64 characters.
var validMachineName = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]*[a-z0-9])?$`)

func mustMachineName(t *testing.T, alloc, task string) string {
	t.Helper()
	name, err := MachineName(alloc, task)
	must.NoError(t, err)
	must.LessEq(t, 64, len(name), must.Sprintf("name %q is too long", name))
	must.RegexMatch(t, validMachineName, name)
	must.StrHasPrefix(t, "nomad-3f2504e0-", name)
	return name
}

func TestMachineName_Shape(t *testing.T) {
	cases := []struct {
		name string
		task string
	}{
		{"plain", "web"},
		{"upper and punctuation", "Web Server!"},
		{"underscore", "my_task"},
		{"dots", "api.v2"},
		{"unicode", "wébsérvér-日本語"},
		{"only unicode", "日本語"},
		{"emoji", "🚀"},
		{"empty", ""},
		{"only punctuation", "!!!"},
		{"leading and trailing dashes", "-web-"},
		{"exactly the room", strings.Repeat("a", 49)},
		{"one over the room", strings.Repeat("a", 50)},
		{"very long", strings.Repeat("task", 100)},
		{"very long with separators", strings.Repeat("ab_", 60)},
		{"truncation lands on a separator", strings.Repeat("a", 41) + "_" + strings.Repeat("b", 40)},
		{"very long unicode", strings.Repeat("ü", 200)},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			name := mustMachineName(t, testAllocID, c.task)
			again := mustMachineName(t, testAllocID, c.task)
			must.EqOp(t, name, again, must.Sprint("MachineName is not deterministic"))
		})
	}
}

func TestMachineName_CleanNamesStayReadable(t *testing.T) {
	for _, task := range []string{"web", "db-1", "a", strings.Repeat("x", 49)} {
		must.EqOp(t, "nomad-3f2504e0-"+task, mustMachineName(t, testAllocID, task))
	}
}

func TestMachineName_Distinct(t *testing.T) {
	tasks := []string{
		"web", "Web", "WEB", "Web!", "web_", "web-", "-web", "web.", "web--x", "web-x", "web_x", "Web_X",
		"", "!", "!!", "日本", "日本語", "🚀", "🛸",
		strings.Repeat("a", 49), strings.Repeat("a", 50), strings.Repeat("a", 51),
		strings.Repeat("a", 200), strings.Repeat("a", 201), strings.Repeat("a", 200) + "b",
	}
	seen := map[string]string{}
	for _, task := range tasks {
		name := mustMachineName(t, testAllocID, task)
		if prev, ok := seen[name]; ok {
			t.Errorf("task names %q and %q both map to machine %q", prev, task, name)
		}
		seen[name] = task
	}
}

func TestMachineName_AllocPrefix(t *testing.T) {
	a, err := MachineName("aaaaaaaa-1111-2222-3333-444444444444", "web")
	must.NoError(t, err)
	b, err := MachineName("bbbbbbbb-1111-2222-3333-444444444444", "web")
	must.NoError(t, err)
	must.NotEq(t, a, b)
	must.StrHasPrefix(t, "nomad-aaaaaaaa-", a)
	must.StrHasPrefix(t, "nomad-bbbbbbbb-", b)
}

func TestMachineName_ShortAllocID(t *testing.T) {
	for _, alloc := range []string{"", "abc", "1234567", "ab!!cd", "ÄÖÜäöüß", "-------------"} {
		t.Run(alloc, func(t *testing.T) {
			name, err := MachineName(alloc, "web")
			must.Error(t, err)
			must.EqOp(t, "", name)
			must.StrContains(t, err.Error(), "too short")
		})
	}
}

func TestUnitName(t *testing.T) {
	must.EqOp(t, "nomad-3f2504e0-web.service", UnitName("nomad-3f2504e0-web"))
	s := Spec{Machine: "nomad-3f2504e0-db"}
	must.EqOp(t, "nomad-3f2504e0-db.service", s.Unit())
}

// A clean task name that happens to look like another task's sanitized name plus its hash
// suffix must not get that task's machine: StartTask removes a machine of its own name as a
// leftover, so a collision in one allocation destroys the sibling's machine.
func TestMachineName_NoCollisionWithHashSuffix(t *testing.T) {
	hashed := mustMachineName(t, testAllocID, "Web!")
	lookalike := strings.TrimPrefix(hashed, "nomad-3f2504e0-") // "web-<6 hex digits>"
	must.NotEq(t, hashed, mustMachineName(t, testAllocID, lookalike),
		must.Sprintf("task names %q and %q share a machine", "Web!", lookalike))
}
