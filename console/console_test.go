// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package console

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/shoenig/test/must"
)

// setup makes a machine directory with a console log holding content, and a FIFO with a reader
// that collects everything.
func setup(t *testing.T, content string) (dir, fifo string, got func() string) {
	t.Helper()
	dir = t.TempDir()
	must.NoError(t, Prepare(dir))
	must.NoError(t, os.WriteFile(Files{dir}.Log(), []byte(content), 0o600))
	fifo = filepath.Join(t.TempDir(), "stdout.fifo")
	must.NoError(t, syscall.Mkfifo(fifo, 0o600))
	out := make(chan string, 1)
	go func() {
		r, err := os.Open(fifo)
		if err != nil {
			out <- err.Error()
			return
		}
		defer r.Close()
		b, _ := io.ReadAll(r)
		out <- string(b)
	}()
	return dir, fifo, func() string {
		select {
		case s := <-out:
			return s
		case <-time.After(10 * time.Second):
			t.Fatal("the FIFO reader got no end of file")
			return ""
		}
	}
}

func run(t *testing.T, fw *Forwarder) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return fw.Run(ctx)
}

func TestForward_EndedMachine(t *testing.T) {
	dir, fifo, got := setup(t, "Welcome\r\nto NixOS\r\nno newline at the end\r")
	must.NoError(t, MarkEnd(dir))
	must.NoError(t, run(t, &Forwarder{Dir: dir, FIFO: fifo, Backlog: 1 << 30}))
	must.EqOp(t, "Welcome\nto NixOS\nno newline at the end\r", got())
	off, err := readOffset(Files{dir}.Offset())
	must.NoError(t, err)
	must.EqOp(t, 41, off)
}

// A forwarder follows the log as it grows and ends once the end is marked and all is delivered.
func TestForward_Follows(t *testing.T) {
	fw := &Forwarder{}
	log, done, got := following(t, fw)
	var want strings.Builder
	for i := range 2000 {
		line := fmt.Sprintf("line %d\r\n", i)
		_, err := log.WriteString(line)
		must.NoError(t, err)
		want.WriteString(strings.ReplaceAll(line, "\r\n", "\n"))
		if i%500 == 0 {
			// "\r" and "\n" in separate writes: the pair still becomes "\n".
			_, _ = log.WriteString("split\r")
			time.Sleep(20 * time.Millisecond)
			_, _ = log.WriteString("\n")
			want.WriteString("split\n")
		}
	}
	select {
	case err := <-done:
		t.Fatalf("forwarder ended before the machine did: %v", err)
	case <-time.After(300 * time.Millisecond):
	}
	must.NoError(t, MarkEnd(fw.Dir))
	must.NoError(t, <-done)
	must.EqOp(t, want.String(), got())
}

// following runs fw on an empty log and returns the log to append to, the forwarder's end and
// what the FIFO's reader got.
func following(t *testing.T, fw *Forwarder) (log *os.File, done <-chan error, got func() string) {
	t.Helper()
	dir, fifo, got := setup(t, "")
	fw.Dir, fw.FIFO, fw.Backlog = dir, fifo, 1<<30
	ended := make(chan error, 1)
	go func() { ended <- run(t, fw) }()
	log, err := os.OpenFile(Files{dir}.Log(), os.O_APPEND|os.O_WRONLY, 0)
	must.NoError(t, err)
	t.Cleanup(func() { log.Close() })
	return log, ended, got
}

// With no inotify instance left (machines' instances all count against root's), the forwarder
// looks at the log in steps instead, says so, and delivers all of it. The test runs itself again
// in a user namespace whose inotify instance limit is 0.
func TestForward_WithoutInotify(t *testing.T) {
	if os.Getenv("CONSOLE_TEST_INOTIFY_LIMITED") == "" {
		cmd := exec.Command(os.Args[0], "-test.run=^TestForward_WithoutInotify$", "-test.v")
		cmd.Env = append(os.Environ(), "CONSOLE_TEST_INOTIFY_LIMITED=1")
		cmd.SysProcAttr = &syscall.SysProcAttr{
			Cloneflags:  syscall.CLONE_NEWUSER,
			UidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: os.Getuid(), Size: 1}},
			GidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: os.Getgid(), Size: 1}},
		}
		out, err := cmd.CombinedOutput()
		must.NoError(t, err, must.Sprint(string(out)))
		must.StrContains(t, string(out), "--- PASS: TestForward_WithoutInotify")
		return
	}
	must.NoError(t, os.WriteFile("/proc/sys/user/max_inotify_instances", []byte("0"), 0))
	var warnings bytes.Buffer
	fw := &Forwarder{Warnings: &warnings}
	log, done, got := following(t, fw)
	var want strings.Builder
	for i := range 50 {
		line := fmt.Sprintf("line %d\r\n", i)
		_, err := log.WriteString(line)
		must.NoError(t, err)
		want.WriteString(fmt.Sprintf("line %d\n", i))
		time.Sleep(10 * time.Millisecond)
	}
	must.NoError(t, MarkEnd(fw.Dir))
	must.NoError(t, <-done)
	must.EqOp(t, want.String(), got())
	must.StrContains(t, warnings.String(), "no inotify instance left (too many open files): the machines' instances all count against root's fs.inotify.max_user_instances; looking for new output every 100ms instead")
}

// A stopped forwarder saves its offset; the next one delivers the rest, nothing twice.
func TestForward_ResumesAtOffset(t *testing.T) {
	dir, fifo, got := setup(t, "one\r\ntwo\r\n")
	must.NoError(t, os.WriteFile(Files{dir}.Offset(), []byte("5"), 0o600))
	must.NoError(t, MarkEnd(dir))
	must.NoError(t, run(t, &Forwarder{Dir: dir, FIFO: fifo, Backlog: 1 << 30}))
	must.EqOp(t, "two\n", got())

	must.NoError(t, os.WriteFile(Files{dir}.Offset(), []byte("x"), 0o600))
	err := (&Forwarder{Dir: dir, FIFO: os.DevNull}).Run(context.Background())
	must.ErrorContains(t, err, "want a byte count")
}

// A forwarder that ended after creating its offset file and before its first record left it
// empty: the next one starts at the beginning instead of refusing to run.
func TestForward_EmptyOffsetIsStart(t *testing.T) {
	dir, fifo, got := setup(t, "one\r\ntwo\r\n")
	must.NoError(t, os.WriteFile(Files{dir}.Offset(), nil, 0o600))
	must.NoError(t, MarkEnd(dir))
	must.NoError(t, run(t, &Forwarder{Dir: dir, FIFO: fifo, Backlog: 1 << 30}))
	must.EqOp(t, "one\ntwo\n", got())
}

func TestForward_StoppedSavesOffset(t *testing.T) {
	dir, fifo, _ := setup(t, "")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- (&Forwarder{Dir: dir, FIFO: fifo, Backlog: 1 << 30}).Run(ctx) }()
	must.NoError(t, os.WriteFile(Files{dir}.Log(), []byte("a\r\nb\r\n"), 0o600))
	time.Sleep(300 * time.Millisecond)
	cancel()
	must.ErrorIs(t, <-done, ErrStopped)
	off, err := readOffset(Files{dir}.Offset())
	must.NoError(t, err)
	must.EqOp(t, 6, off)
}

// Past the backlog bound the undelivered part is dropped, with a marker line in the stream and
// a record for the plugin; what comes after is delivered.
func TestForward_DropsBacklog(t *testing.T) {
	content := strings.Repeat("0123456789\r\n", 100) + "the newest line"
	dir, fifo, got := setup(t, content)
	at := time.Date(2026, 12, 2, 18, 0, 0, 0, time.UTC)
	must.NoError(t, MarkEnd(dir))
	must.NoError(t, run(t, &Forwarder{Dir: dir, FIFO: fifo, Backlog: 100, Now: func() time.Time { return at }}))
	want := "nomad-driver-nixos: dropped 1200 bytes of console output at 2026-12-02T18:00:00Z (Nomad's log reader was more than 100B behind)\nthe newest line"
	must.EqOp(t, want, got())
	rec, err := os.ReadFile(Files{dir}.Dropped())
	must.NoError(t, err)
	must.EqOp(t, "2026-12-02T18:00:00Z 1200\n", string(rec))
}

// The marker starts a line of its own when the drop cuts one.
func TestDrop_MidLine(t *testing.T) {
	out := forwardInTwoWrites(t, "start of a line", strings.Repeat("x", 100)+"\n")
	must.StrHasPrefix(t, "start of a line\nnomad-driver-nixos: dropped 101 bytes", out)
	must.StrHasSuffix(t, "behind)\n", out)
}

// A line begun before the drop is finished first when its rest is within the backlog.
func TestDrop_FinishesLineBegun(t *testing.T) {
	out := forwardInTwoWrites(t, "start of a line", ", its end\n"+strings.Repeat("x", 100)+"\nthe newest line")
	must.StrHasPrefix(t, "start of a line, its end\nnomad-driver-nixos: dropped 101 bytes", out)
	must.StrHasSuffix(t, "behind)\nthe newest line", out)
}

// forwardInTwoWrites runs a forwarder with a backlog of 50 bytes while the console gets first,
// which it delivers before rest is written, then rest, and returns what reached the FIFO.
func forwardInTwoWrites(t *testing.T, first, rest string) string {
	dir, fifo, got := setup(t, "")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- (&Forwarder{Dir: dir, FIFO: fifo, Backlog: 50}).Run(ctx) }()
	log, err := os.OpenFile(Files{dir}.Log(), os.O_APPEND|os.O_WRONLY, 0)
	must.NoError(t, err)
	_, _ = log.WriteString(first)
	waitOffset(t, dir, int64(len(first)))
	_, _ = log.WriteString(rest)
	log.Close()
	waitOffset(t, dir, int64(len(first)+len(rest)))
	must.NoError(t, MarkEnd(dir))
	must.NoError(t, <-done)
	return got()
}

// waitOffset waits until the forwarder has dealt with (delivered or dropped) the first n bytes
// of the console log.
func waitOffset(t *testing.T, dir string, n int64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		off, err := readOffset(Files{dir}.Offset())
		must.NoError(t, err)
		if off >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the forwarder is at byte %d of the console log after 10s, not %d", off, n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Delivered blocks are freed, but the last KeepTail bytes stay readable for Tail.
func TestForward_PunchesDelivered(t *testing.T) {
	var b bytes.Buffer
	for i := 0; b.Len() < 8<<20; i++ {
		fmt.Fprintf(&b, "line %d\r\n", i)
	}
	dir, fifo, got := setup(t, b.String())
	must.NoError(t, MarkEnd(dir))
	must.NoError(t, run(t, &Forwarder{Dir: dir, FIFO: fifo, Backlog: 1 << 30}))
	must.EqOp(t, strings.ReplaceAll(b.String(), "\r\n", "\n"), got())
	var st syscall.Stat_t
	must.NoError(t, syscall.Stat(Files{dir}.Log(), &st))
	if st.Blocks*512 > 4<<20 {
		t.Skipf("%s does not punch holes (%d bytes allocated)", dir, st.Blocks*512)
	}
	lines := strings.Split(strings.TrimRight(b.String(), "\r\n"), "\r\n")
	must.Eq(t, lines[len(lines)-3:], Tail(dir, 3))
}

func TestTail(t *testing.T) {
	dir := t.TempDir()
	must.SliceEmpty(t, Tail(dir, 20))
	must.NoError(t, Prepare(dir))
	must.SliceEmpty(t, Tail(dir, 20))
	must.NoError(t, os.WriteFile(Files{dir}.Log(), []byte("a\r\nb\r\nContainer x terminated by signal KILL.\r\n"), 0o600))
	must.Eq(t, []string{"b", "Container x terminated by signal KILL."}, Tail(dir, 2))
	must.Eq(t, []string{"a", "b", "Container x terminated by signal KILL."}, Tail(dir, 20))
}

func TestPrepare_ClearsEarlierMachine(t *testing.T) {
	dir := t.TempDir()
	f := Files{dir}
	for _, p := range []string{f.Log(), f.Offset(), f.End(), f.Dropped(), f.DroppedSeen()} {
		must.NoError(t, os.WriteFile(p, []byte("old"), 0o600))
	}
	must.NoError(t, Prepare(dir))
	b, err := os.ReadFile(f.Log())
	must.NoError(t, err)
	must.SliceEmpty(t, b)
	for _, p := range []string{f.Offset(), f.End(), f.Dropped(), f.DroppedSeen()} {
		_, err := os.Stat(p)
		must.True(t, errors.Is(err, os.ErrNotExist), must.Sprint(p))
	}
}

// Pieces fit one atomic pipe write, end at a line's end when more follows, and never split "\r\n".
func TestNextPiece(t *testing.T) {
	short := []byte("ab\r\ncd")
	must.Eq(t, short, nextPiece(short))

	lines := bytes.Repeat([]byte("0123456789abcd\r\n"), 1000)
	p := nextPiece(lines)
	must.LessEq(t, atomicWrite, len(p))
	must.True(t, bytes.HasSuffix(p, []byte("\r\n")))
	must.Greater(t, atomicWrite-16, len(p))

	long := bytes.Repeat([]byte("x"), 2*atomicWrite)
	must.EqOp(t, atomicWrite, len(nextPiece(long)))
	long[atomicWrite-1] = '\r'
	must.EqOp(t, atomicWrite-1, len(nextPiece(long)))
}

func TestParseSize(t *testing.T) {
	for s, want := range map[string]int64{"1GiB": 1 << 30, "512MiB": 512 << 20, "100MB": 100e6, "64KiB": 64 << 10, "10B": 10, " 2 GiB ": 2 << 30} {
		got, err := ParseSize(s)
		must.NoError(t, err, must.Sprint(s))
		must.EqOp(t, want, got, must.Sprint(s))
	}
	for _, s := range []string{"", "1000", "0GiB", "-1MiB", "1.5GiB", "GiB", "1 PB", "99999999999TiB"} {
		_, err := ParseSize(s)
		must.ErrorContains(t, err, "is not a size", must.Sprint(s))
	}
	must.EqOp(t, "1GiB", FormatSize(1<<30))
	must.EqOp(t, "1500B", FormatSize(1500))
	must.EqOp(t, "3MiB", FormatSize(3<<20))
}
