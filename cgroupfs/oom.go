// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package cgroupfs

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// WatchOOM calls oom each time the kernel's OOM killer acts in the cgroup at path, until ctx ends
// or the cgroup goes away. It listens for the kernel's notification rather than polling the
// counter: when the guest's PID 1 is the victim, the machine and its cgroup are gone within
// milliseconds, before any poll would look.
func (c Cgroups) WatchOOM(ctx context.Context, path string, oom func()) error {
	if c.Mode == CgroupUnified {
		return watchOOMv2(ctx, filepath.Join(c.Base, path, "memory.events"), oom)
	}
	return watchOOMv1(ctx, filepath.Join(c.Base, "memory", path), oom)
}

// watchOOMv2 follows memory.events, which the kernel marks modified when its counters change.
func watchOOMv2(ctx context.Context, events string, oom func()) error {
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		return err
	}
	f := os.NewFile(uintptr(fd), "inotify")
	defer f.Close()
	if _, err := unix.InotifyAddWatch(fd, events, unix.IN_MODIFY); err != nil {
		return fmt.Errorf("watching %s: %w", events, err)
	}
	stop := context.AfterFunc(ctx, func() { f.Close() })
	defer stop()
	last, err := readKeyValues(events)
	if err != nil {
		return err
	}
	buf := make([]byte, 4096)
	for {
		if _, err := f.Read(buf); err != nil {
			return nil // closed: ctx ended
		}
		now, err := readKeyValues(events)
		if err != nil {
			return nil // the cgroup is gone
		}
		kills, ok := now["oom_kill"]
		if !ok {
			continue // read while being rewritten
		}
		for i := last["oom_kill"]; i < kills; i++ {
			oom()
		}
		last = now
	}
}

// watchOOMv1 registers an eventfd for memory.oom_control through cgroup.event_control. The kernel
// signals it when the cgroup runs out of memory, before its victim dies, and also when the
// cgroup is removed, which the still readable oom_control tells apart.
func watchOOMv1(ctx context.Context, dir string, oom func()) error {
	control, err := os.Open(filepath.Join(dir, "memory.oom_control"))
	if err != nil {
		return err
	}
	defer control.Close()
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return err
	}
	f := os.NewFile(uintptr(efd), "eventfd")
	defer f.Close()
	reg := fmt.Sprintf("%d %d", efd, control.Fd())
	if err := os.WriteFile(filepath.Join(dir, "cgroup.event_control"), []byte(reg), 0); err != nil {
		return fmt.Errorf("registering for OOM events of %s: %w", dir, err)
	}
	stop := context.AfterFunc(ctx, func() { f.Close() })
	defer stop()
	buf := make([]byte, 8)
	for {
		if _, err := f.Read(buf); err != nil {
			return nil // closed: ctx ended
		}
		if _, err := os.Stat(control.Name()); err != nil {
			return nil // the cgroup is gone
		}
		oom()
	}
}
