// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package console

import (
	"context"
	"errors"
	"time"

	"golang.org/x/sys/unix"
)

// watch wakes the forwarder when a file in the machine directory changes: the log grows, or the
// plugin marks the end. A watch without an inotify instance (fd -1) wakes every pollStep.
type watch struct{ fd int }

// pollStep is how often a watch looks for a stop signal, and a watch without inotify for changes.
const pollStep = 100 * time.Millisecond

// newWatch watches dir. Without an inotify instance left for the user (EMFILE: the machines'
// instances all count against root's fs.inotify.max_user_instances) it returns a polling watch
// and the error.
func newWatch(dir string) (*watch, error) {
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if errors.Is(err, unix.EMFILE) {
		return &watch{fd: -1}, err
	}
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
	if w.fd < 0 {
		select {
		case <-ctx.Done():
		case <-time.After(min(timeout, pollStep)):
		}
		return
	}
	// Polled in short steps, so a stop signal is seen without a second descriptor.
	for waited := time.Duration(0); waited < timeout && ctx.Err() == nil; waited += pollStep {
		fds := []unix.PollFd{{Fd: int32(w.fd), Events: unix.POLLIN}}
		n, err := unix.Poll(fds, int(pollStep.Milliseconds()))
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

func (w *watch) Close() error {
	if w.fd < 0 {
		return nil
	}
	return unix.Close(w.fd)
}
