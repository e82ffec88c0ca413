// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

//go:build integration

package driver

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/shoenig/test/must"
	"github.com/shoenig/test/wait"

	"github.com/nomad-nixos/nomad-driver-nixos/console"
	"github.com/nomad-nixos/nomad-driver-nixos/nspawn"
)

// consoleStream is what a reader of a task's stdout FIFO saw: the lines of one numbered
// sequence ("<prefix><n> ..."), checked for order as they come, and the other lines.
type consoleStream struct {
	prefix string
	// count is how many sequence lines came; last is the number of the last one.
	count, last int
	// disorder describes the first line that was not the next of the sequence.
	disorder string
	other    []string
	bytes    int64
	// firstAt and doneAt are when "tinyinit: ready" and the line with done came.
	firstAt, doneAt time.Time
}

// order is what a sequence may do besides going on by one.
type order int

const (
	strict order = iota
	// gaps: jump forward (output was dropped, with a marker), never back.
	gaps
	// repeats: go back (a forwarder killed with SIGKILL repeats its last write), never skip ahead.
	repeats
)

// readConsole reads a task's stdout FIFO, as Nomad's logmon does, until its last writer closes
// it. With hold, the FIFO is opened at once but read only after hold is closed.
func readConsole(t testing.TB, fifo, prefix, done string, hold <-chan struct{}, o order, progress func(int)) <-chan *consoleStream {
	t.Helper()
	var held *os.File
	if hold != nil {
		var err error
		held, err = os.OpenFile(fifo, os.O_RDONLY|syscall.O_NONBLOCK, 0)
		must.NoError(t, err)
	}
	out := make(chan *consoleStream, 1)
	go func() {
		f := held
		if hold != nil {
			<-hold
		} else {
			// Blocks until the forwarder opens the FIFO, as logmon's open does.
			var err error
			if f, err = os.Open(fifo); err != nil {
				panic(err)
			}
		}
		defer f.Close()
		s := &consoleStream{prefix: prefix}
		r := bufio.NewReaderSize(f, 256<<10)
		for {
			line, err := r.ReadString('\n')
			s.bytes += int64(len(line))
			if line != "" {
				s.see(strings.TrimSuffix(line, "\n"), done, o)
				if progress != nil && s.count%10000 == 0 {
					progress(s.count)
				}
			}
			if err != nil {
				out <- s
				return
			}
		}
	}()
	return out
}

func (s *consoleStream) see(line, done string, o order) {
	if rest, ok := strings.CutPrefix(line, s.prefix); ok {
		num, _, _ := strings.Cut(rest, " ")
		n, err := strconv.Atoi(num)
		ok := err == nil && (n == s.last+1 || (o == gaps && n > s.last) || (o == repeats && n <= s.last))
		if s.disorder == "" && !ok {
			s.disorder = fmt.Sprintf("line %q after number %d", line, s.last)
		}
		s.count++
		if o != repeats || n > s.last {
			s.last = n
		}
		return
	}
	switch {
	case line == "tinyinit: ready":
		s.firstAt = time.Now()
	case done != "" && strings.HasPrefix(line, done):
		s.doneAt = time.Now()
	}
	if len(s.other) < 100 {
		s.other = append(s.other, line)
	}
}

func (s *consoleStream) String() string {
	return fmt.Sprintf("%d lines of %q, last %d, %d bytes; disorder: %q; other lines: %q", s.count, s.prefix, s.last, s.bytes, s.disorder, s.other)
}

func waitStream(t testing.TB, ch <-chan *consoleStream, timeout time.Duration) *consoleStream {
	t.Helper()
	select {
	case s := <-ch:
		return s
	case <-time.After(timeout):
		t.Fatalf("the stdout FIFO did not end within %s", timeout)
		return nil
	}
}

// taskFIFO gives the task a stdout FIFO of the test's own instead of logmon's.
func taskFIFO(t testing.TB, cfg *drivers.TaskConfig) string {
	fifo := filepath.Join(t.TempDir(), "stdout.fifo")
	must.NoError(t, syscall.Mkfifo(fifo, 0o600))
	cfg.StdoutPath = fifo
	return fifo
}

// The issue: journald dropped most of a 200,000-line burst. A million lines arrive, in order,
// with the last one.
func TestConsoleBurst(t *testing.T) {
	td := newTestDriver(t, "")
	const lines = 1_000_000
	cfg := td.newTask(t, "burst", tinyToplevel(t), []string{fmt.Sprintf("lines=%d", lines), "print=tinyinit: burst done", "exit=0"})
	stream := readConsole(t, taskFIFO(t, cfg), "tinyinit line ", "tinyinit: burst done", nil, strict, nil)
	start := time.Now()
	td.start(t, cfg)
	s := waitStream(t, stream, 10*time.Minute)
	t.Logf("%d lines, %d bytes in %s", s.count, s.bytes, time.Since(start))
	must.EqOp(t, "", s.disorder, must.Sprint(s))
	must.EqOp(t, lines, s.count, must.Sprint(s))
	must.EqOp(t, lines, s.last, must.Sprint(s))
	must.SliceContains(t, s.other, "tinyinit: burst done", must.Sprint(s))
	res := td.waitExit(t, cfg.ID, time.Minute)
	must.NoError(t, res.Err)
	must.EqOp(t, 0, res.ExitCode)
}

// The issue: 100 MB to /dev/console blocked the writer for minutes and most of it was dropped.
func TestConsoleFlood(t *testing.T) {
	td := newTestDriver(t, "")
	const size = 100_000_000
	cfg := td.newTask(t, "flood", tinyToplevel(t), []string{fmt.Sprintf("flood=%d", size), "exit=0"})
	stream := readConsole(t, taskFIFO(t, cfg), "tinyinit flood ", "tinyinit: flood done", nil, strict, nil)
	start := time.Now()
	td.start(t, cfg)
	s := waitStream(t, stream, 10*time.Minute)
	t.Logf("%d lines, %d bytes in %s (guest ready to last line: %s)", s.count, s.bytes, time.Since(start), s.doneAt.Sub(s.firstAt))
	must.EqOp(t, "", s.disorder, must.Sprint(s))
	must.EqOp(t, size/100, s.count, must.Sprint(s))
	must.EqOp(t, size/100, s.last, must.Sprint(s))
	must.SliceContains(t, s.other, fmt.Sprintf("tinyinit: flood done %d", size/100), must.Sprint(s))
	res := td.waitExit(t, cfg.ID, time.Minute)
	must.NoError(t, res.Err)
	// The forwarder freed what it delivered: the log takes about its readable tail on disk.
	var st syscall.Stat_t
	must.NoError(t, syscall.Stat(filepath.Join(td.machineDir(t, cfg), console.LogName), &st))
	must.Less(t, int64(8<<20), st.Blocks*512, must.Sprint("blocks of console.log after delivery"))
}

// A forwarder that is killed mid-stream is restarted by systemd and resumes at its saved offset
// with the FIFOs it kept in systemd's descriptor store: Nomad's reader never sees the end of its
// FIFO. Killed with SIGTERM (twice), it saves its offset first: nothing is lost or repeated.
// Killed with SIGKILL, nothing is lost and no line is broken, but the one atomic piece (at most
// 4 KiB of whole lines) it wrote and had not recorded yet may come again.
func TestConsoleForwarderKilled(t *testing.T) {
	td := newTestDriver(t, "")
	const lines = 1_000_000
	for _, tc := range []struct {
		signal string
		order  order
	}{{"SIGTERM", strict}, {"SIGKILL", repeats}} {
		t.Run(tc.signal, func(t *testing.T) {
			cfg := td.newTask(t, "fwdkill", tinyToplevel(t), []string{fmt.Sprintf("lines=%d", lines), "print=tinyinit: burst done", "exit=0"})
			unit := nspawn.ConsoleUnit(mustMachine(t, cfg))
			// At 100,000 and 400,000 lines read, kill the forwarder.
			killed := 0
			stream := readConsole(t, taskFIFO(t, cfg), "tinyinit line ", "", nil, tc.order, func(n int) {
				if (killed == 0 && n >= 100_000) || (killed == 1 && n >= 400_000) {
					killed++
					if out, err := exec.Command("systemctl", "kill", "--signal="+tc.signal, unit).CombinedOutput(); err != nil {
						panic(fmt.Sprintf("systemctl kill %s: %v: %s", unit, err, out))
					}
				}
			})
			td.start(t, cfg)
			s := waitStream(t, stream, 10*time.Minute)
			must.EqOp(t, 2, killed, must.Sprint(s))
			must.EqOp(t, "", s.disorder, must.Sprint(s))
			must.EqOp(t, lines, s.last, must.Sprint(s))
			must.SliceContains(t, s.other, "tinyinit: burst done", must.Sprint(s))
			if tc.order == strict {
				must.EqOp(t, lines, s.count, must.Sprint(s))
			} else {
				// At most one piece of 4 KiB (about 200 of these lines) again per kill.
				must.LessEq(t, lines+2*200, s.count, must.Sprint(s))
			}
			res := td.waitExit(t, cfg.ID, time.Minute)
			must.NoError(t, res.Err)
		})
	}
}

// The plugin dies mid-stream and a new one recovers the task: the console goes on, whole.
func TestConsoleAcrossPluginRestart(t *testing.T) {
	dataDir := t.TempDir()
	td := newTestDriver(t, dataDir)
	const lines = 1_000_000
	cfg := td.newTask(t, "plugrestart", tinyToplevel(t), []string{fmt.Sprintf("lines=%d", lines), "sleep=2s", "exit=3"})
	halfway := make(chan struct{})
	var once sync.Once
	stream := readConsole(t, taskFIFO(t, cfg), "tinyinit line ", "", nil, strict, func(n int) {
		if n >= 200_000 {
			once.Do(func() { close(halfway) })
		}
	})
	handle, _, err := td.StartTask(cfg)
	must.NoError(t, err)
	select {
	case <-halfway:
	case <-time.After(5 * time.Minute):
		t.Fatal("the console did not reach 200,000 lines")
	}
	td.d.Shutdown()
	td.Kill()

	td2 := newTestDriver(t, dataDir)
	must.NoError(t, td2.RecoverTask(handle))
	t.Cleanup(func() { _ = td2.d.DestroyTask(cfg.ID, true) })
	s := waitStream(t, stream, 10*time.Minute)
	must.EqOp(t, "", s.disorder, must.Sprint(s))
	must.EqOp(t, lines, s.count, must.Sprint(s))
	must.EqOp(t, lines, s.last, must.Sprint(s))
	res := td2.waitExit(t, cfg.ID, time.Minute)
	must.NoError(t, res.Err)
	must.EqOp(t, 3, res.ExitCode)
}

// A reader that falls further behind than console_backlog loses the backlog, never silently: a
// marker line in the stream says how much and when, and a task event reports it.
func TestConsoleBacklogDrop(t *testing.T) {
	td := newTestDriver(t, "", func(pc *PluginConfig) { pc.ConsoleBacklog = "256KiB" })
	events, err := td.TaskEvents(context.Background())
	must.NoError(t, err)
	cfg := td.newTask(t, "backlog", tinyToplevel(t), []string{"lines=200000", "print=tinyinit: after", "sleep=3s", "exit=0"})
	hold := make(chan struct{})
	stream := readConsole(t, taskFIFO(t, cfg), "tinyinit line ", "", hold, gaps, nil)
	td.start(t, cfg)
	// The reader reads nothing until the guest printed everything.
	dir := td.machineDir(t, cfg)
	must.Wait(t, wait.InitialSuccess(
		wait.BoolFunc(func() bool { return strings.Contains(strings.Join(console.Tail(dir, 3), "\n"), "tinyinit: after") }),
		wait.Timeout(3*time.Minute), wait.Gap(100*time.Millisecond),
	))
	close(hold)
	s := waitStream(t, stream, 5*time.Minute)
	var markers []string
	for _, l := range s.other {
		if strings.HasPrefix(l, "nomad-driver-nixos: dropped ") {
			markers = append(markers, l)
		}
	}
	must.SliceNotEmpty(t, markers, must.Sprint(s))
	must.StrContains(t, markers[0], "bytes of console output at ")
	must.StrContains(t, markers[0], "(Nomad's log reader was more than 256KiB behind)")
	must.EqOp(t, "", s.disorder, must.Sprint(s))
	must.Less(t, 200000, s.count, must.Sprint(s))
	waitEvent(t, events, cfg.ID, "Dropped ", time.Minute)
	res := td.waitExit(t, cfg.ID, time.Minute)
	must.NoError(t, res.Err)
}
