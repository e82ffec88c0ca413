// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package console

import (
	"context"
	"errors"
	"os"
	"syscall"
	"time"
)

// fifoRetry is how long a writer waits before trying a full or reader-less FIFO again.
const fifoRetry = 10 * time.Millisecond

// openFIFO opens Nomad's log FIFO for writing without ever blocking past ctx: the reader may not
// be there yet, and a blocked open or write would keep a forwarder from ever ending.
func openFIFO(ctx context.Context, path string) (*fifoWriter, error) {
	for {
		f, err := os.OpenFile(path, os.O_WRONLY|syscall.O_NONBLOCK, 0)
		if err == nil {
			return &fifoWriter{f: f}, nil
		}
		if !errors.Is(err, syscall.ENXIO) {
			return nil, err
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(fifoRetry):
		}
	}
}

// fifoWriter writes to a FIFO opened non-blocking.
type fifoWriter struct {
	f *os.File
}

// Write blocks while the FIFO is full, but never past ctx. Go polls a FIFO opened non-blocking,
// so a full pipe shows up as a passed deadline, or as EAGAIN otherwise.
func (w *fifoWriter) Write(ctx context.Context, p []byte) (int, error) {
	written := 0
	for written < len(p) {
		_ = w.f.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
		n, err := w.f.Write(p[written:])
		written += n
		if err == nil {
			continue
		}
		if !errors.Is(err, syscall.EAGAIN) && !errors.Is(err, os.ErrDeadlineExceeded) {
			return written, err
		}
		select {
		case <-ctx.Done():
			return written, ctx.Err()
		case <-time.After(fifoRetry):
		}
	}
	return written, nil
}

func (w *fifoWriter) Close() error { return w.f.Close() }
