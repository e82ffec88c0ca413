// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package nspawn

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/shoenig/test/must"
)

func TestMessage(t *testing.T) {
	cases := []struct {
		name string
		raw  string
		want string
	}{
		{"string", `"Welcome to NixOS!"`, "Welcome to NixOS!"},
		{"string with escapes", `"tab\there \"quoted\" \u00fc"`, "tab\there \"quoted\" ü"},
		{"trailing carriage return", `"line\r"`, "line"},
		{"several carriage returns", `"line\r\r"`, "line"},
		{"inner carriage return kept", `"a\rb"`, "a\rb"},
		{"empty", `""`, ""},
		{"byte array", `[104,105]`, "hi"},
		{"byte array, not UTF-8", `[104,255,105,13]`, "h\xffi"},
		{"byte array with escape sequence", `[27,91,49,109,79,75,27,91,48,109]`, "\x1b[1mOK\x1b[0m"},
		{"null", `null`, ""},
		{"number", `42`, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			must.EqOp(t, c.want, message(json.RawMessage(c.raw)))
		})
	}
}

// fakeJournalctl is a journalctl that logs its arguments and prints the JSON entries in
// entriesFile (after answering --sync and --show-cursor as journalctl does).
func fakeJournalctl(t *testing.T, cursor string) (bin, argsFile, entriesFile string) {
	t.Helper()
	if _, err := os.Stat("/bin/sh"); err != nil {
		t.Skip("no /bin/sh")
	}
	dir := t.TempDir()
	bin = filepath.Join(dir, "journalctl")
	argsFile = filepath.Join(dir, "args")
	entriesFile = filepath.Join(dir, "entries")
	cursorLine := ""
	if cursor != "" {
		cursorLine = "-- cursor: " + cursor
	}
	script := fmt.Sprintf(`#!/bin/sh
printf '%%s\n' "$*" >>'%s'
case "$*" in
--sync) exit 0 ;;
*--show-cursor*) printf '%%s\n' '%s'; exit 0 ;;
esac
cat '%s' 2>/dev/null
`, argsFile, cursorLine, entriesFile)
	must.NoError(t, os.WriteFile(bin, []byte(script), 0o755))
	return bin, argsFile, entriesFile
}

func readArgs(t *testing.T, file string) []string {
	t.Helper()
	b, err := os.ReadFile(file)
	must.NoError(t, err)
	return strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
}

// testFIFO makes a FIFO with a reader, as Nomad's logmon holds it, and returns the reader.
func testFIFO(t *testing.T) (string, *os.File) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "web.stdout")
	must.NoError(t, syscall.Mkfifo(path, 0o600))
	r, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	must.NoError(t, err)
	t.Cleanup(func() { r.Close() })
	return path, r
}

// readAll reads what the closed writers left in the FIFO.
func readAll(t *testing.T, r *os.File) string {
	t.Helper()
	must.NoError(t, r.SetReadDeadline(time.Now().Add(5*time.Second)))
	b, err := io.ReadAll(r)
	must.NoError(t, err)
	return string(b)
}

func TestStartCursor(t *testing.T) {
	bin, argsFile, _ := fakeJournalctl(t, "s=abc;i=1")
	cursorFile := filepath.Join(t.TempDir(), "console.cursor")
	must.NoError(t, StartCursor(bin, cursorFile))
	b, err := os.ReadFile(cursorFile)
	must.NoError(t, err)
	must.EqOp(t, "s=abc;i=1", string(b))
	must.StrContains(t, readArgs(t, argsFile)[0], "--lines=0")

	// An empty journal has no cursor: the file is empty and forwarding starts at the beginning.
	bin, _, _ = fakeJournalctl(t, "")
	must.NoError(t, StartCursor(bin, cursorFile))
	b, err = os.ReadFile(cursorFile)
	must.NoError(t, err)
	must.EqOp(t, "", string(b))

	must.Error(t, StartCursor(filepath.Join(t.TempDir(), "missing"), cursorFile))
}

func TestConsoleForward(t *testing.T) {
	bin, argsFile, entriesFile := fakeJournalctl(t, "s=abc;i=1")
	cursorFile := filepath.Join(t.TempDir(), "console.cursor")
	must.NoError(t, StartCursor(bin, cursorFile))
	must.NoError(t, os.WriteFile(entriesFile, []byte(strings.Join([]string{
		`{"__CURSOR":"s=abc;i=2","MESSAGE":"Welcome to NixOS!","_SYSTEMD_UNIT":"nomad-x.service"}`,
		`{"__CURSOR":"s=abc;i=3","MESSAGE":[104,105,13]}`,
		`not json`,
		`{"MESSAGE":"an entry without a cursor is skipped"}`,
		`{"__CURSOR":"s=abc;i=4","MESSAGE":"Container nomad-x terminated by signal KILL.\r"}`,
	}, "\n")+"\n"), 0o644))
	path, r := testFIFO(t)
	c := &Console{Journalctl: bin, Unit: "nomad-x.service", CursorFile: cursorFile, FIFO: path}

	w, err := openFIFO(context.Background(), path)
	must.NoError(t, err)
	must.NoError(t, c.forward(context.Background(), w, false))
	b, err := os.ReadFile(cursorFile)
	must.NoError(t, err)
	must.EqOp(t, "s=abc;i=4", string(b))
	args := readArgs(t, argsFile)
	last := args[len(args)-1]
	must.StrContains(t, last, "--output=json")
	must.StrContains(t, last, "_SYSTEMD_UNIT=nomad-x.service")
	must.StrContains(t, last, "--after-cursor=s=abc;i=1")
	must.StrNotContains(t, last, "--follow")

	// A second run resumes after the last line forwarded and forwards nothing new.
	must.NoError(t, os.WriteFile(entriesFile, nil, 0o644))
	must.NoError(t, c.forward(context.Background(), w, true))
	args = readArgs(t, argsFile)
	last = args[len(args)-1]
	must.StrContains(t, last, "--after-cursor=s=abc;i=4")
	must.StrContains(t, last, "--follow")
	b, err = os.ReadFile(cursorFile)
	must.NoError(t, err)
	must.EqOp(t, "s=abc;i=4", string(b))

	must.NoError(t, w.Close())
	must.EqOp(t, "Welcome to NixOS!\nhi\nContainer nomad-x terminated by signal KILL.\n", readAll(t, r))
}

func TestConsoleForward_NoCursor(t *testing.T) {
	bin, argsFile, _ := fakeJournalctl(t, "")
	cursorFile := filepath.Join(t.TempDir(), "console.cursor")
	must.NoError(t, StartCursor(bin, cursorFile))
	path, _ := testFIFO(t)
	w, err := openFIFO(context.Background(), path)
	must.NoError(t, err)
	defer w.Close()
	c := &Console{Journalctl: bin, Unit: "nomad-x.service", CursorFile: cursorFile, FIFO: path}
	must.NoError(t, c.forward(context.Background(), w, false))
	args := readArgs(t, argsFile)
	must.StrContains(t, args[len(args)-1], "--no-tail")
	must.StrNotContains(t, args[len(args)-1], "--after-cursor")
}

func TestConsoleForward_NoCursorFile(t *testing.T) {
	path, _ := testFIFO(t)
	w, err := openFIFO(context.Background(), path)
	must.NoError(t, err)
	defer w.Close()
	c := &Console{Journalctl: "/nonexistent/journalctl", Unit: "nomad-x.service", CursorFile: filepath.Join(t.TempDir(), "console.cursor")}
	must.ErrorContains(t, c.forward(context.Background(), w, false), "nomad-x.service")
}

func TestConsoleTail(t *testing.T) {
	bin, argsFile, entriesFile := fakeJournalctl(t, "")
	must.NoError(t, os.WriteFile(entriesFile, []byte("[  OK  ] Reached target Multi-User System.\r\nContainer nomad-x terminated by signal KILL.\r\n"), 0o644))
	got := ConsoleTail(bin, "0f5b2a1c9d8e4f7a", 20)
	must.Eq(t, []string{"[  OK  ] Reached target Multi-User System.", "Container nomad-x terminated by signal KILL."}, got)
	args := readArgs(t, argsFile)
	must.StrContains(t, args[0], "_SYSTEMD_INVOCATION_ID=0f5b2a1c9d8e4f7a")
	must.StrContains(t, args[0], "--lines=20")

	// No invocation, no journal: no lines, and nothing is run.
	must.SliceEmpty(t, ConsoleTail(bin, "", 20))
	must.EqOp(t, 1, len(readArgs(t, argsFile)))
	must.SliceEmpty(t, ConsoleTail(filepath.Join(t.TempDir(), "missing"), "0f5b2a1c9d8e4f7a", 20))
}

func TestConsoleUnitProperties(t *testing.T) {
	c := &Console{
		Journalctl: "/run/current-system/sw/bin/journalctl",
		Unit:       "nomad-3f2504e0-web.service",
		CursorFile: "/var/lib/nomad-driver-nixos/machines/nomad-3f2504e0-web/console.cursor",
		FIFO:       "/var/lib/nomad/alloc/3f2504e0/alloc/logs/.web.stdout.fifo",
		StderrFIFO: "/var/lib/nomad/alloc/3f2504e0/alloc/logs/.web.stderr.fifo",
	}
	props := map[string]any{}
	for _, p := range c.UnitProperties("/nix/store/x-nomad-driver-nixos/bin/nomad-driver-nixos") {
		_, dup := props[p.Name]
		must.False(t, dup, must.Sprintf("property %s is set twice", p.Name))
		props[p.Name] = p.Value.Value()
	}
	must.EqOp(t, "on-failure", props["Restart"].(string))
	exec := reflect.ValueOf(props["ExecStart"])
	must.EqOp(t, 1, exec.Len())
	argv := exec.Index(0).FieldByName("Args").Interface().([]string)
	must.Eq(t, []string{
		"/nix/store/x-nomad-driver-nixos/bin/nomad-driver-nixos", ConsoleCommand,
		"-journalctl", c.Journalctl, "-unit", c.Unit, "-cursor", c.CursorFile, "-fifo", c.FIFO,
		"-stderr-fifo", c.StderrFIFO,
	}, argv)
	must.EqOp(t, "nomad-3f2504e0-web-console.service", ConsoleUnit("nomad-3f2504e0-web"))
	must.NotEq(t, UnitName("nomad-3f2504e0-web"), ConsoleUnit("nomad-3f2504e0-web"))
}

func TestConsoleMain_BadArguments(t *testing.T) {
	devnull, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	must.NoError(t, err)
	defer devnull.Close()
	stderr := os.Stderr
	os.Stderr = devnull // the flag package prints the usage there
	defer func() { os.Stderr = stderr }()
	must.EqOp(t, 2, ConsoleMain([]string{"-no-such-flag"}))
}

func TestPaths(t *testing.T) {
	must.EqOp(t, "/data/machines/m/console.cursor", CursorPath("/data/machines/m"))
	must.EqOp(t, "/data/machines/m/exit", ExitFilePath("/data/machines/m"))
	must.NotEq(t, CursorPath("/d"), ExitFilePath("/d"))
}
