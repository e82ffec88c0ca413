// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package nspawn

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	sddbus "github.com/coreos/go-systemd/v22/dbus"
)

// ConsoleCommand is the argument that makes the plugin binary run as a console forwarder.
const ConsoleCommand = "console"

// drainTimeout bounds how long a forwarder tries to deliver the last lines of an ended machine.
const drainTimeout = 30 * time.Second

// Console forwards a machine unit's console from the journal to Nomad's log FIFO. It runs as a
// transient unit of its own: Nomad's log reader stops for good once the last writer of its FIFO
// closes, so the writer must outlive plugin restarts. The machine writes to the journal and never
// blocks on a missing reader; the forwarder keeps its journal cursor in a file, so a forwarder
// restarted by systemd resumes where the last one stopped.
type Console struct {
	Journalctl string
	Unit       string
	CursorFile string
	FIFO       string
	// StderrFIFO is held open while forwarding, though everything goes to FIFO: Nomad's log
	// reader for it waits for a writer, and would otherwise stall each task's teardown.
	StderrFIFO string
}

// ConsoleUnit is the name of the forwarder unit of a machine.
func ConsoleUnit(machine string) string { return machine + "-console.service" }

// StartCursor stores the journal's current end as the place to forward from, so a unit that
// reuses a name does not replay the lines of an earlier run. Call it before starting the unit.
func StartCursor(journalctl, cursorFile string) error {
	out, err := exec.Command(journalctl, "--quiet", "--lines=0", "--show-cursor", "--no-pager").Output()
	if err != nil {
		return fmt.Errorf("reading the journal cursor: %w", err)
	}
	cursor := ""
	for _, line := range strings.Split(string(out), "\n") {
		if c, ok := strings.CutPrefix(line, "-- cursor: "); ok {
			cursor = strings.TrimSpace(c)
		}
	}
	return writeCursor(cursorFile, cursor)
}

func writeCursor(file, cursor string) error {
	tmp := file + ".tmp"
	if err := os.WriteFile(tmp, []byte(cursor), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, file)
}

// UnitProperties are the properties of the forwarder's transient unit; self is this binary.
func (c *Console) UnitProperties(self string) []sddbus.Property {
	return []sddbus.Property{
		sddbus.PropDescription("Console of " + c.Unit),
		sddbus.PropExecStart([]string{self, ConsoleCommand,
			"-journalctl", c.Journalctl, "-unit", c.Unit, "-cursor", c.CursorFile, "-fifo", c.FIFO, "-stderr-fifo", c.StderrFIFO}, true),
		sddbus.PropType("exec"),
		prop("Restart", "on-failure"),
		prop("RestartUSec", uint64(time.Second.Microseconds())),
		prop("StandardInput", "null"),
		prop("StandardOutput", "journal"),
	}
}

// ConsoleMain runs a forwarder from command line arguments and returns the exit status.
func ConsoleMain(args []string) int {
	fs := flag.NewFlagSet(ConsoleCommand, flag.ContinueOnError)
	var c Console
	fs.StringVar(&c.Journalctl, "journalctl", "", "journalctl binary")
	fs.StringVar(&c.Unit, "unit", "", "machine unit whose console to forward")
	fs.StringVar(&c.CursorFile, "cursor", "", "file holding the journal cursor")
	fs.StringVar(&c.FIFO, "fifo", "", "Nomad's log FIFO")
	fs.StringVar(&c.StderrFIFO, "stderr-fifo", "", "Nomad's stderr log FIFO, held open")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := c.Run(ctx, NewManager()); err != nil {
		fmt.Fprintln(os.Stderr, "console forwarder:", err)
		return 1
	}
	return 0
}

// Run forwards until the machine unit ended, then delivers what is left and returns.
func (c *Console) Run(ctx context.Context, mgr *Manager) error {
	w, err := openFIFO(ctx, c.FIFO)
	if err != nil {
		return err
	}
	defer w.Close()
	if c.StderrFIFO != "" {
		stderr, err := openFIFO(ctx, c.StderrFIFO)
		if err != nil {
			return err
		}
		defer stderr.Close()
	}

	followCtx, stopFollow := context.WithCancel(ctx)
	defer stopFollow()
	followed := make(chan error, 1)
	go func() { followed <- c.forward(followCtx, w, true) }()
	for ended := false; !ended; {
		select {
		case <-ctx.Done():
			stopFollow()
			<-followed
			return nil
		case err := <-followed:
			stopFollow()
			if err != nil {
				return err
			}
			ended = true
		case <-time.After(250 * time.Millisecond):
			st, err := mgr.Status(ctx, c.Unit)
			if err == nil && !st.Running() {
				ended = true
				stopFollow()
				<-followed
			}
		}
	}
	drainCtx, cancel := context.WithTimeout(context.Background(), drainTimeout)
	defer cancel()
	w.ctx = drainCtx
	// Lines nspawn wrote just before exiting may still sit in journald's stream buffers.
	_ = exec.CommandContext(drainCtx, c.Journalctl, "--sync").Run()
	return c.forward(drainCtx, w, false)
}

type journalEntry struct {
	Cursor  string          `json:"__CURSOR"`
	Message json.RawMessage `json:"MESSAGE"`
}

func (c *Console) forward(ctx context.Context, w *fifoWriter, follow bool) error {
	b, err := os.ReadFile(c.CursorFile)
	if err != nil {
		return fmt.Errorf("console cursor of %s: %w", c.Unit, err)
	}
	cursor := strings.TrimSpace(string(b))
	// --all: without it journalctl's JSON gives fields over 4 KiB as null, losing long lines.
	args := []string{"--output=json", "--all", "--no-pager", "--quiet", "_SYSTEMD_UNIT=" + c.Unit}
	if follow {
		args = append(args, "--follow")
	}
	if cursor != "" {
		args = append(args, "--after-cursor="+cursor)
	} else {
		args = append(args, "--no-tail")
	}
	cmd := exec.CommandContext(ctx, c.Journalctl, args...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("reading the journal: %w", err)
	}
	defer func() { _ = cmd.Wait() }()

	r := bufio.NewReaderSize(out, 64*1024)
	for {
		line, err := r.ReadBytes('\n')
		if len(line) > 0 {
			var e journalEntry
			if json.Unmarshal(line, &e) == nil && e.Cursor != "" {
				if _, werr := w.Write([]byte(message(e.Message) + "\n")); werr != nil {
					_ = writeCursor(c.CursorFile, cursor)
					return werr
				}
				cursor = e.Cursor
				// One cursor write per burst, not per line.
				if r.Buffered() == 0 {
					if cerr := writeCursor(c.CursorFile, cursor); cerr != nil {
						return cerr
					}
				}
			}
		}
		if err != nil {
			// Stopped or at the end: what was written is delivered, so the next forward (the
			// drain, or a restarted forwarder) must start after it.
			if ctx.Err() != nil || errors.Is(err, io.EOF) {
				return writeCursor(c.CursorFile, cursor)
			}
			return err
		}
	}
}

// message decodes MESSAGE, which the journal gives as a string, or as a byte array when it is
// not valid UTF-8. The console is a terminal, so lines end in \r\n.
func message(raw json.RawMessage) string {
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return strings.TrimRight(s, "\r")
	}
	var ints []int
	var b []byte
	if json.Unmarshal(raw, &ints) == nil {
		for _, i := range ints {
			b = append(b, byte(i))
		}
	}
	return strings.TrimRight(string(b), "\r")
}

// ConsoleTail returns the last n console lines of one invocation of a unit.
func ConsoleTail(journalctl, invocationID string, n int) []string {
	if invocationID == "" {
		return nil
	}
	out, err := exec.Command(journalctl, "--output=cat", "--no-pager", "--quiet",
		fmt.Sprintf("--lines=%d", n), "_SYSTEMD_INVOCATION_ID="+invocationID).Output()
	if err != nil {
		return nil
	}
	if len(out) == 0 {
		return nil
	}
	var lines []string
	for _, l := range strings.Split(strings.TrimRight(string(out), "\n"), "\n") {
		lines = append(lines, strings.TrimRight(l, "\r"))
	}
	return lines
}

// CursorPath is where the console cursor of a machine lives, beside its root.
func CursorPath(machineDir string) string { return filepath.Join(machineDir, "console.cursor") }

// ExitFilePath is where a machine's unit records its exit, beside its root.
func ExitFilePath(machineDir string) string { return filepath.Join(machineDir, "exit") }
