// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package nspawn

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
)

// consoleTail is how many recent console lines a Console keeps for error messages.
const consoleTail = 20

// Console forwards a unit's console output from the journal to a writer (Nomad's log FIFO). The
// unit writes to the journal, so the machine never blocks on a missing reader; the forwarder
// stores the journal cursor of every burst it delivered, so a restarted plugin resumes where the
// last one stopped instead of losing or repeating lines.
type Console struct {
	Journalctl string
	Unit       string
	CursorFile string
	// Open opens the destination; it is called again after a write fails (a restarted reader).
	Open func() (io.WriteCloser, error)

	mu   sync.Mutex
	tail []string
}

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

func (c *Console) cursor() (string, error) {
	b, err := os.ReadFile(c.CursorFile)
	if err != nil {
		return "", fmt.Errorf("console cursor of %s: %w", c.Unit, err)
	}
	return strings.TrimSpace(string(b)), nil
}

// Tail returns the last console lines seen.
func (c *Console) Tail() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.tail...)
}

// Follow forwards lines until ctx ends. It returns nil on ctx's end.
func (c *Console) Follow(ctx context.Context) error {
	return c.forward(ctx, true)
}

// Drain forwards what the journal holds for the unit now, then returns. Call it after the unit
// ended so its last lines reach the log before the exit is reported.
func (c *Console) Drain(ctx context.Context) error {
	// Lines nspawn wrote just before exiting may still sit in journald's stream buffers.
	_ = exec.CommandContext(ctx, c.Journalctl, "--sync").Run()
	return c.forward(ctx, false)
}

type journalEntry struct {
	Cursor  string          `json:"__CURSOR"`
	Message json.RawMessage `json:"MESSAGE"`
}

func (c *Console) forward(ctx context.Context, follow bool) error {
	cursor, err := c.cursor()
	if err != nil {
		return err
	}
	args := []string{"--output=json", "--no-pager", "--quiet", "_SYSTEMD_UNIT=" + c.Unit}
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

	w, err := c.Open()
	if err != nil {
		_ = cmd.Process.Kill()
		return err
	}
	defer func() { w.Close() }()

	r := bufio.NewReaderSize(out, 64*1024)
	for {
		line, err := r.ReadBytes('\n')
		if len(line) > 0 {
			var e journalEntry
			if jerr := json.Unmarshal(line, &e); jerr == nil && e.Cursor != "" {
				msg := message(e.Message)
				if werr := c.write(&w, msg); werr != nil {
					_ = cmd.Process.Kill()
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
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, io.EOF) {
				return writeCursor(c.CursorFile, cursor)
			}
			return err
		}
	}
}

func (c *Console) write(w *io.WriteCloser, msg string) error {
	c.mu.Lock()
	c.tail = append(c.tail, msg)
	if len(c.tail) > consoleTail {
		c.tail = c.tail[len(c.tail)-consoleTail:]
	}
	c.mu.Unlock()
	data := []byte(msg + "\n")
	if _, err := (*w).Write(data); err == nil {
		return nil
	}
	(*w).Close()
	nw, err := c.Open()
	if err != nil {
		return err
	}
	*w = nw
	_, err = nw.Write(data)
	return err
}

// message decodes MESSAGE, which the journal gives as a string, or as a byte array when it is
// not valid UTF-8.
func message(raw json.RawMessage) string {
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return strings.TrimRight(s, "\r")
	}
	var b []byte
	var ints []int
	if json.Unmarshal(raw, &ints) == nil {
		for _, i := range ints {
			b = append(b, byte(i))
		}
	}
	return strings.TrimRight(string(b), "\r")
}

// CursorPath is where the console cursor of a machine lives, beside its root.
func CursorPath(machineDir string) string { return filepath.Join(machineDir, "console.cursor") }
