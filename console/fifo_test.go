// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package console

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/shoenig/test/must"
)

func mkfifo(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "task.stdout.fifo")
	must.NoError(t, syscall.Mkfifo(path, 0o600))
	return path
}

// Without a reader, opening keeps retrying until the context ends.
func TestOpenFIFO_NoReader(t *testing.T) {
	path := mkfifo(t)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	w, err := openFIFO(ctx, path)
	must.Nil(t, w)
	must.ErrorIs(t, err, context.DeadlineExceeded)
	must.Greater(t, 90*time.Millisecond, time.Since(start))
	must.Less(t, 2*time.Second, time.Since(start))
}

func TestOpenFIFO_Cancelled(t *testing.T) {
	path := mkfifo(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := openFIFO(ctx, path)
		done <- err
	}()
	time.Sleep(30 * time.Millisecond)
	cancel()
	select {
	case err := <-done:
		must.ErrorIs(t, err, context.Canceled)
	case <-time.After(2 * time.Second):
		t.Fatal("openFIFO did not return after its context was cancelled")
	}
}

// A reader that shows up later (logmon restarting) is found by the retries.
func TestOpenFIFO_ReaderArrivesLater(t *testing.T) {
	path := mkfifo(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	type result struct {
		w   *fifoWriter
		err error
	}
	done := make(chan result, 1)
	go func() {
		w, err := openFIFO(ctx, path)
		done <- result{w, err}
	}()
	time.Sleep(50 * time.Millisecond)
	r, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	must.NoError(t, err)
	defer r.Close()
	res := <-done
	must.NoError(t, res.err)
	defer res.w.Close()

	n, err := res.w.Write(context.Background(), []byte("hello\n"))
	must.NoError(t, err)
	must.EqOp(t, 6, n)
	must.NoError(t, r.SetReadDeadline(time.Now().Add(2*time.Second)))
	buf := make([]byte, 16)
	n, err = r.Read(buf)
	must.NoError(t, err)
	must.EqOp(t, "hello\n", string(buf[:n]))
}

func TestOpenFIFO_Missing(t *testing.T) {
	_, err := openFIFO(context.Background(), filepath.Join(t.TempDir(), "missing", "fifo"))
	must.Error(t, err)
	must.True(t, errors.Is(err, os.ErrNotExist))
}

// A write larger than the pipe completes while the reader keeps reading.
func TestFIFOWriter_LargeWrite(t *testing.T) {
	path := mkfifo(t)
	r, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	must.NoError(t, err)
	defer r.Close()
	w, err := openFIFO(context.Background(), path)
	must.NoError(t, err)

	data := bytes.Repeat([]byte("0123456789abcdef"), 64*1024) // 1 MiB, many pipe buffers
	got := make(chan []byte, 1)
	go func() {
		var buf bytes.Buffer
		_ = r.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, _ = buf.ReadFrom(r)
		got <- buf.Bytes()
	}()
	n, err := w.Write(context.Background(), data)
	must.NoError(t, err)
	must.EqOp(t, len(data), n)
	must.NoError(t, w.Close())
	must.True(t, bytes.Equal(data, <-got))
}

// A reader that never reads fills the pipe; the writer then gives up when its context ends
// instead of blocking forever.
func TestFIFOWriter_FullPipe(t *testing.T) {
	path := mkfifo(t)
	r, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	must.NoError(t, err)
	defer r.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	w, err := openFIFO(ctx, path)
	must.NoError(t, err)
	defer w.Close()

	data := make([]byte, 4<<20) // more than any pipe buffer
	start := time.Now()
	n, err := w.Write(ctx, data)
	must.ErrorIs(t, err, context.DeadlineExceeded)
	must.Positive(t, n)
	must.Less(t, len(data), n)
	must.Less(t, 3*time.Second, time.Since(start))
}

// A write ends with its context, even while the pipe is full.
func TestFIFOWriter_Cancelled(t *testing.T) {
	path := mkfifo(t)
	r, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	must.NoError(t, err)
	defer r.Close()
	w, err := openFIFO(context.Background(), path)
	must.NoError(t, err)
	defer w.Close()

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err = w.Write(ctx, make([]byte, 4<<20))
	must.ErrorIs(t, err, context.Canceled)
}

// A reader that went away is an error at once, not a retry until the context ends.
func TestFIFOWriter_ReaderGone(t *testing.T) {
	path := mkfifo(t)
	r, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	must.NoError(t, err)
	w, err := openFIFO(context.Background(), path)
	must.NoError(t, err)
	defer w.Close()
	must.NoError(t, r.Close())

	done := make(chan error, 1)
	go func() {
		_, err := w.Write(context.Background(), []byte("lost\n"))
		done <- err
	}()
	select {
	case err := <-done:
		must.ErrorIs(t, err, syscall.EPIPE)
	case <-time.After(2 * time.Second):
		t.Fatal("write to a FIFO without reader did not fail")
	}
}
