// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

// Package console forwards a machine's console from the file its unit appends to, to Nomad's
// log FIFO. It runs in a small helper binary of its own, one per machine, so it must not import
// Nomad or systemd packages: only the standard library and golang.org/x/sys.
package console

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Files of a machine's console, in its machine directory.
const (
	// LogName is what the machine unit appends its console to.
	LogName = "console.log"
	// OffsetName holds how far into the log the forwarder delivered, so a restarted one resumes.
	OffsetName = "console.offset"
	// EndName is written by the plugin once the machine ended for good: the forwarder drains the
	// log and exits. The unit's own end is no signal: with reboot_policy = "restart" it runs again.
	EndName = "console.end"
	// DroppedName gets one "TIME BYTES" line for each time the forwarder dropped a backlog.
	DroppedName = "console.dropped"
	// DroppedSeenName holds how much of DroppedName the plugin reported as task events.
	DroppedSeenName = "console.dropped.seen"
)

const (
	// chunk is how much one read of the log moves.
	chunk = 64 << 10
	// atomicWrite is PIPE_BUF: a write to a pipe of at most this much is atomic, all or nothing.
	// Each write to the FIFO is one such piece, ending at a line's end where it can, and the
	// offset is saved after each, so a forwarder killed at any moment (even by SIGKILL) leaves
	// no partial line behind; at most the one piece it wrote but had not recorded comes again.
	atomicWrite = 4096
	// KeepTail is how much of the log stays readable behind the forwarded offset; the rest is
	// punched out, so a machine's log takes little disk however much it printed.
	KeepTail = 64 << 10
	// punchStep is how much delivered log gathers before its blocks are freed.
	punchStep = 1 << 20
	// idleWake bounds a wait for the log to grow when no inotify event comes.
	idleWake = time.Second
	// gather is how long a forwarder that caught up lets output gather before it reads again:
	// nspawn appends in pieces of a few KiB, and one read, write and offset save for each would
	// cost more than the console itself.
	gather = 10 * time.Millisecond
)

// Files names the console files of a machine directory.
type Files struct{ Dir string }

func (f Files) Log() string         { return filepath.Join(f.Dir, LogName) }
func (f Files) Offset() string      { return filepath.Join(f.Dir, OffsetName) }
func (f Files) End() string         { return filepath.Join(f.Dir, EndName) }
func (f Files) Dropped() string     { return filepath.Join(f.Dir, DroppedName) }
func (f Files) DroppedSeen() string { return filepath.Join(f.Dir, DroppedSeenName) }

// Prepare makes an empty log and removes what an earlier machine of the same name left.
func Prepare(dir string) error {
	f := Files{dir}
	for _, p := range []string{f.Offset(), f.End(), f.Dropped(), f.DroppedSeen()} {
		if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	log, err := os.OpenFile(f.Log(), os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return fmt.Errorf("creating the console log: %w", err)
	}
	return log.Close()
}

// MarkEnd tells the forwarder that the machine ended for good.
func MarkEnd(dir string) error {
	return os.WriteFile(Files{dir}.End(), nil, 0o600)
}

// Forwarder copies a machine's console log to Nomad's log FIFO.
type Forwarder struct {
	Dir string
	// FIFO is Nomad's stdout log FIFO; everything goes there, in order.
	FIFO string
	// StderrFIFO is held open while forwarding: Nomad's log reader for it waits for a writer, and
	// would otherwise stall each task's teardown.
	StderrFIFO string
	// Backlog is how far Nomad's reader may fall behind before the forwarder drops what it did
	// not deliver, saying so in the log and in DroppedName.
	Backlog int64
	// Now is the clock of drop reports.
	Now func() time.Time
	// Warnings gets what the forwarder does otherwise than it should; nil discards it.
	Warnings io.Writer
}

// ErrStopped is returned when the forwarder was stopped before the machine ended; it saved its
// offset, and a new forwarder resumes there.
var ErrStopped = errors.New("stopped before the machine ended")

// Run forwards until the machine ended (EndName exists) and the log is delivered, or ctx ends.
func (fw *Forwarder) Run(ctx context.Context) error {
	files := Files{fw.Dir}
	stored := inheritedFDs()
	out, err := openStored(ctx, stored, "stdout", fw.FIFO)
	if err != nil {
		return err
	}
	defer out.Close()
	if fw.StderrFIFO != "" {
		stderr, err := openStored(ctx, stored, "stderr", fw.StderrFIFO)
		if err != nil {
			return err
		}
		defer stderr.Close()
	}
	// Read-write: freeing delivered blocks (fallocate) needs a writable descriptor.
	log, err := os.OpenFile(files.Log(), os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer log.Close()
	offset, err := readOffset(files.Offset())
	if err != nil {
		return err
	}
	offsetFile, err := os.OpenFile(files.Offset(), os.O_CREATE|os.O_WRONLY, 0o600)
	if err != nil {
		return fmt.Errorf("opening the console offset: %w", err)
	}
	defer offsetFile.Close()
	notify, err := newWatch(fw.Dir)
	switch {
	case errors.Is(err, unix.EMFILE):
		if fw.Warnings != nil {
			fmt.Fprintf(fw.Warnings, "no inotify instance left (%v): the machines' instances all count against root's fs.inotify.max_user_instances; looking for new output every %s instead\n", err, pollStep)
		}
	case err != nil:
		return err
	}
	defer notify.Close()

	s := &state{fw: fw, files: files, log: log, out: out, offsetFile: offsetFile, offset: offset, translated: make([]byte, 0, atomicWrite)}
	s.atLineStart = offset == 0 || s.byteBefore(offset) == '\n'
	buf := make([]byte, chunk)
	for {
		if ctx.Err() != nil {
			return ErrStopped
		}
		ended := exists(files.End())
		fi, err := log.Stat()
		if err != nil {
			return err
		}
		size := fi.Size()
		if fw.Backlog > 0 && size-s.offset > fw.Backlog {
			if err := s.drop(ctx, buf, size); err != nil {
				return err
			}
			continue
		}
		moved, err := s.forward(ctx, buf, size, ended)
		if err != nil {
			return err
		}
		if moved {
			if !ended && s.offset >= size-1 {
				time.Sleep(gather)
			}
			continue
		}
		if ended && s.offset >= size {
			return nil
		}
		notify.Wait(ctx, idleWake)
	}
}

type state struct {
	fw          *Forwarder
	files       Files
	log         *os.File
	out         *fifoWriter
	offsetFile  *os.File
	offset      int64
	punched     int64
	atLineStart bool
	// translated is the buffer of a chunk with "\r\n" turned into "\n".
	translated []byte
}

func (s *state) byteBefore(offset int64) byte {
	b := make([]byte, 1)
	if _, err := s.log.ReadAt(b, offset-1); err != nil {
		return '\n'
	}
	return b[0]
}

// forward delivers one chunk of the log from the offset, in atomic pieces. A console is a
// terminal, so lines end in "\r\n"; they are delivered with "\n" alone. A "\r" at the end of what
// is there yet waits for the next byte, unless the machine ended.
func (s *state) forward(ctx context.Context, buf []byte, size int64, ended bool) (bool, error) {
	if s.offset >= size {
		return false, nil
	}
	n, err := s.log.ReadAt(buf[:min(int64(len(buf)), size-s.offset)], s.offset)
	if err != nil && !errors.Is(err, io.EOF) {
		return false, err
	}
	in := buf[:n]
	last := s.offset+int64(n) >= size
	if len(in) > 0 && in[len(in)-1] == '\r' && !(last && ended) {
		in = in[:len(in)-1]
	}
	if len(in) == 0 {
		return false, nil
	}
	for len(in) > 0 {
		piece := nextPiece(in)
		out := crlfToLF(s.translated[:0], piece)
		if written, err := s.out.Write(ctx, out); err != nil || written != len(out) {
			if err == nil {
				err = io.ErrShortWrite
			}
			return false, s.writeError(ctx, err)
		}
		s.offset += int64(len(piece))
		s.atLineStart = out[len(out)-1] == '\n'
		if err := s.save(); err != nil {
			return false, err
		}
		in = in[len(piece):]
	}
	return true, nil
}

// nextPiece is the start of in that goes to the FIFO in one atomic write: at most atomicWrite
// bytes, cut after its last line end when more follows, and never split between "\r" and "\n".
func nextPiece(in []byte) []byte {
	if len(in) <= atomicWrite {
		return in
	}
	piece := in[:atomicWrite]
	if i := bytes.LastIndexByte(piece, '\n'); i >= 0 {
		return piece[:i+1]
	}
	if piece[len(piece)-1] == '\r' {
		return piece[:len(piece)-1]
	}
	return piece
}

// writeError turns a failed write into the forwarder's result. A FIFO whose reader went away is
// taken out of the descriptor store: the next forwarder opens it anew and waits for a reader.
func (s *state) writeError(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ErrStopped
	}
	if errors.Is(err, unix.EPIPE) {
		dropStoredFD("stdout")
	}
	return fmt.Errorf("writing to %s: %w", s.fw.FIFO, err)
}

// crlfToLF appends src to dst with each "\r\n" turned into "\n".
func crlfToLF(dst, src []byte) []byte {
	for len(src) > 0 {
		i := bytes.Index(src, []byte("\r\n"))
		if i < 0 {
			return append(dst, src...)
		}
		dst = append(dst, src[:i]...)
		dst = append(dst, '\n')
		src = src[i+2:]
	}
	return dst
}

// drop skips everything not delivered yet but the newest line, which may still be growing,
// records it, and says so in the log stream. A line already begun is finished first when its
// rest is within the backlog, so the drop cuts no line; a longer rest is cut, and the marker
// starts a line of its own.
func (s *state) drop(ctx context.Context, buf []byte, size int64) error {
	if !s.atLineStart {
		if end, ok := s.lineEnd(size, s.fw.Backlog); ok {
			for s.offset < end {
				moved, err := s.forward(ctx, buf, end, false)
				if err != nil {
					return err
				}
				if !moved {
					break
				}
			}
		}
	}
	to := s.lineStart(size)
	if to <= s.offset {
		return nil
	}
	dropped := to - s.offset
	at := time.Now
	if s.fw.Now != nil {
		at = s.fw.Now
	}
	when := at().UTC().Format(time.RFC3339)
	record, err := os.OpenFile(s.files.Dropped(), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(record, "%s %d\n", when, dropped)
	if cerr := record.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("recording dropped console output: %w", err)
	}
	s.offset = to
	if err := s.save(); err != nil {
		return err
	}
	marker := DropMarker(dropped, when, s.fw.Backlog)
	if !s.atLineStart {
		marker = "\n" + marker
	}
	s.atLineStart = true
	if _, err := s.out.Write(ctx, []byte(marker)); err != nil {
		return s.writeError(ctx, err)
	}
	return nil
}

// lineEnd is the offset after the newline that ends the line at the forwarded offset, if that
// newline is within limit bytes.
func (s *state) lineEnd(size, limit int64) (int64, bool) {
	buf := make([]byte, min(size-s.offset, limit))
	n, _ := s.log.ReadAt(buf, s.offset)
	if i := bytes.IndexByte(buf[:n], '\n'); i >= 0 {
		return s.offset + int64(i) + 1, true
	}
	return 0, false
}

// lineStart is where the last line that starts before size starts, if that is within the last
// KeepTail bytes; otherwise size.
func (s *state) lineStart(size int64) int64 {
	from := max(s.offset, size-KeepTail)
	buf := make([]byte, size-from)
	n, _ := s.log.ReadAt(buf, from)
	if i := bytes.LastIndexByte(buf[:n], '\n'); i >= 0 {
		return from + int64(i) + 1
	}
	return size
}

// DropMarker is the line that stands in the log for console output that was dropped.
func DropMarker(bytes int64, when string, backlog int64) string {
	return fmt.Sprintf("nomad-driver-nixos: dropped %d bytes of console output at %s (Nomad's log reader was more than %s behind)\n",
		bytes, when, FormatSize(backlog))
}

// save records the offset and frees the log's blocks that were delivered long enough ago. The
// record has a fixed width and is written in place with one write, so a forwarder killed at any
// moment leaves a whole one, old or new.
func (s *state) save() error {
	if _, err := s.offsetFile.WriteAt([]byte(fmt.Sprintf("%020d\n", s.offset)), 0); err != nil {
		return fmt.Errorf("saving the console offset: %w", err)
	}
	if end := (s.offset - KeepTail) &^ 4095; end-s.punched >= punchStep {
		// A filesystem that cannot punch holes keeps the blocks: the log is still whole.
		_ = unix.Fallocate(int(s.log.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, s.punched, end-s.punched)
		s.punched = end
	}
	return nil
}

// openStored returns the FIFO descriptor an earlier forwarder left in systemd's store, or opens
// the FIFO and stores the descriptor.
func openStored(ctx context.Context, stored map[string]*os.File, name, path string) (*fifoWriter, error) {
	if f := stored[name]; f != nil {
		return &fifoWriter{f: f}, nil
	}
	w, err := openFIFO(ctx, path)
	if err != nil {
		if ctx.Err() != nil {
			return nil, ErrStopped
		}
		return nil, fmt.Errorf("opening %s: %w", path, err)
	}
	storeFD(name, w.f)
	return w, nil
}

func readOffset(path string) (int64, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	// A forwarder that ended between creating the file and its first record (written whole,
	// in one write) had delivered nothing.
	if len(b) == 0 {
		return 0, nil
	}
	off, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil || off < 0 {
		return 0, fmt.Errorf("console offset %s: want a byte count, got %q", path, b)
	}
	return off, nil
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// Tail returns the last n lines of a machine's console (what is left readable of it).
func Tail(dir string, n int) []string {
	f, err := os.Open(Files{dir}.Log())
	if err != nil {
		return nil
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil || fi.Size() == 0 {
		return nil
	}
	from := max(0, fi.Size()-KeepTail)
	b := make([]byte, fi.Size()-from)
	if _, err := f.ReadAt(b, from); err != nil && !errors.Is(err, io.EOF) {
		return nil
	}
	lines := strings.Split(strings.TrimRight(string(b), "\r\n"), "\n")
	if from > 0 {
		// The first line is cut.
		lines = lines[1:]
	}
	lines = lines[max(0, len(lines)-n):]
	for i, l := range lines {
		lines[i] = strings.TrimRight(l, "\r")
	}
	return lines
}
