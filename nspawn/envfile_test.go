// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package nspawn

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/shoenig/test/must"
)

func TestEnvFile_Golden(t *testing.T) {
	content, skipped := EnvFile(map[string]string{
		"PLAIN":     "value",
		"BACKSLASH": `C:\dir\n`,
		"QUOTES":    `say "hi"`,
		"SHELL":     "`id` $HOME ${HOME}",
		"MULTILINE": "line1\nline2\n",
		"EMPTY":     "",
		"_under":    "'single'",
		"1BAD":      "x",
		"BAD-NAME":  "x",
		"":          "x",
		"BAD NAME":  "x",
		"ÜNICODE":   "x",
	})
	must.EqOp(t, `BACKSLASH="C:\\dir\\n"
EMPTY=""
MULTILINE="line1
line2
"
PLAIN="value"
QUOTES="say \"hi\""
SHELL="\`+"`id\\` \\$HOME \\${HOME}"+`"
_under="'single'"
`, content)
	must.Eq(t, []string{"", "1BAD", "BAD NAME", "BAD-NAME", "ÜNICODE"}, skipped)
}

func TestEnvFile_Empty(t *testing.T) {
	content, skipped := EnvFile(nil)
	must.EqOp(t, "", content)
	must.SliceEmpty(t, skipped)
}

// parseEnvFile reads KEY="value" lines the way systemd's EnvironmentFile= parser reads double
// quoted values: a backslash before one of "\`$ escapes it, a backslash before a newline joins
// lines, any other backslash stays, and a literal newline is part of the value.
func parseEnvFile(t *testing.T, content string) map[string]string {
	t.Helper()
	out := map[string]string{}
	for content != "" {
		key, rest, ok := strings.Cut(content, `="`)
		must.True(t, ok, must.Sprintf("no KEY=\" in %q", content))
		must.StrNotContains(t, key, "\n")
		var v strings.Builder
		i := 0
		for ; i < len(rest); i++ {
			c := rest[i]
			if c == '"' {
				break
			}
			if c == '\\' && i+1 < len(rest) {
				i++
				switch n := rest[i]; {
				case strings.IndexByte("\"\\`$", n) >= 0:
					v.WriteByte(n)
				case n == '\n':
				default:
					v.WriteByte('\\')
					v.WriteByte(n)
				}
				continue
			}
			v.WriteByte(c)
		}
		must.Less(t, len(rest), i, must.Sprintf("unterminated value for %s", key))
		out[key] = v.String()
		content = rest[i+1:]
		must.StrHasPrefix(t, "\n", content)
		content = content[1:]
	}
	return out
}

func TestEnvFile_RoundTrip(t *testing.T) {
	env := map[string]string{
		"A":               `\`,
		"B":               `\\`,
		"C":               "ends with backslash\\",
		"D":               "backslash before newline\\\nnext",
		"E":               `"`,
		"F":               `""""`,
		"G":               "$",
		"H":               "$$ and ${X} and $(cmd)",
		"I":               "`",
		"J":               "\n",
		"K":               "\r\n\t",
		"L":               `\n is not a newline`,
		"M":               "'",
		"N":               "ünïcödé ✓",
		"NOMAD_TASK_NAME": "web",
	}
	content, skipped := EnvFile(env)
	must.SliceEmpty(t, skipped)
	must.Eq(t, env, parseEnvFile(t, content))
}

func TestWriteEnvFile(t *testing.T) {
	old := syscall.Umask(0o077)
	defer syscall.Umask(old)

	dir := t.TempDir()
	path := filepath.Join(dir, "nomad.env")
	skipped, err := WriteEnvFile(path, map[string]string{"B": "2", "A": `"1"`, "bad-name": "x"})
	must.NoError(t, err)
	must.Eq(t, []string{"bad-name"}, skipped)
	b, err := os.ReadFile(path)
	must.NoError(t, err)
	must.EqOp(t, "A=\"\\\"1\\\"\"\nB=\"2\"\n", string(b))
	fi, err := os.Stat(path)
	must.NoError(t, err)
	// World-readable despite the umask: the guest's services read it through a user namespace.
	must.EqOp(t, os.FileMode(0o644), fi.Mode())

	// No temporary file is left behind.
	entries, err := os.ReadDir(dir)
	must.NoError(t, err)
	must.EqOp(t, 1, len(entries))
	must.EqOp(t, "nomad.env", entries[0].Name())
}

// WriteEnvFile replaces the file instead of rewriting it in place: a reader that opened the old
// file sees the old content whole, never a truncated or mixed one.
func TestWriteEnvFile_Atomic(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "nomad.env")
	must.NoError(t, os.WriteFile(path, []byte("OLD=\"1\"\n"), 0o600))
	f, err := os.Open(path)
	must.NoError(t, err)
	defer f.Close()

	_, err = WriteEnvFile(path, map[string]string{"NEW": "2"})
	must.NoError(t, err)

	b, err := os.ReadFile(path)
	must.NoError(t, err)
	must.EqOp(t, "NEW=\"2\"\n", string(b))
	fi, err := os.Stat(path)
	must.NoError(t, err)
	must.EqOp(t, os.FileMode(0o644), fi.Mode())

	old := make([]byte, 64)
	n, _ := f.Read(old)
	must.EqOp(t, "OLD=\"1\"\n", string(old[:n]))
}

func TestWriteEnvFile_MissingDir(t *testing.T) {
	path := filepath.Join(t.TempDir(), "missing", "nomad.env")
	_, err := WriteEnvFile(path, map[string]string{"A": "1"})
	must.Error(t, err)
	_, err = os.Stat(path)
	must.True(t, os.IsNotExist(err))
}

func TestValidEnvName(t *testing.T) {
	for _, ok := range []string{"A", "a", "_", "_1", "NOMAD_TASK_NAME", "x9"} {
		must.True(t, ValidEnvName(ok), must.Sprint(ok))
	}
	for _, bad := range []string{"", "1A", "A-B", "A B", "A=B", "Ä", "A\x00", "A\n", "A.B"} {
		must.False(t, ValidEnvName(bad), must.Sprintf("%q", bad))
	}
}
