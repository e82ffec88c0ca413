// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package console

import (
	"context"
	"time"

	"golang.org/x/sys/unix"
)

// watch wakes the forwarder when a file in the machine directory changes: the log grows, or the
// plugin marks the end.
type watch struct{ fd int }

func newWatch(dir string) (*watch, error) {
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		return nil, err
	}
	if _, err := unix.InotifyAddWatch(fd, dir, unix.IN_MODIFY|unix.IN_CREATE|unix.IN_MOVED_TO|unix.IN_CLOSE_WRITE); err != nil {
		unix.Close(fd)
		return nil, err
	}
	return &watch{fd: fd}, nil
}

// Wait returns after an event, after timeout, or soon after ctx ended, and discards the events
// that queued up: the forwarder looks at the files themselves.
func (w *watch) Wait(ctx context.Context, timeout time.Duration) {
	// Polled in short steps, so a stop signal is seen without a second descriptor.
	const step = 100 * time.Millisecond
	for waited := time.Duration(0); waited < timeout && ctx.Err() == nil; waited += step {
		fds := []unix.PollFd{{Fd: int32(w.fd), Events: unix.POLLIN}}
		n, err := unix.Poll(fds, int(step.Milliseconds()))
		if err != nil && err != unix.EINTR {
			return
		}
		if n > 0 {
			buf := make([]byte, 4096)
			for {
				if n, err := unix.Read(w.fd, buf); n <= 0 || err != nil {
					return
				}
			}
		}
	}
}

func (w *watch) Close() error { return unix.Close(w.fd) }
